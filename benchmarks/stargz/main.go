// containerd-stargz-grpc for the cold-start benchmark, built from Debian's
// golang-github-containerd-stargz-snapshotter-dev sources (Debian ships only ctr-remote).
//
// It does what upstream's cmd/containerd-stargz-grpc (and the library's service package) do for a
// snapshots proxy plugin, and no more: the stargz filesystem (default fs config: prioritized-files
// prefetch and background fetch on, as upstream ships it) + the remote snapshotter, served as
// containerd's snapshots gRPC API on a unix socket. The service package itself is not used: its
// resolver imports k8s.io/cri-api, which Debian bookworm does not package. Registry hosts are built
// here as upstream's resolver does for a host without mirrors (127.0.0.1/localhost over plain HTTP,
// docker.MatchLocalhost). No CRI keychain: the benchmark talks to a plain-HTTP loopback registry.
package main

import (
	"context"
	"flag"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"net/http"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

var (
	address    = flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	configPath = flag.String("config", "", "optional TOML file with the library's fs config (fs/config.Config)")
	logLevel   = flag.String("log-level", "info", "trace, debug, info, warn, error")
	rootDir    = flag.String("root", "/var/lib/containerd-stargz-grpc", "root directory")
)

func main() {
	flag.Parse()
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		log.L.WithError(err).Fatal("bad log level")
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var config fsconfig.Config
	if *configPath != "" {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			log.G(ctx).WithError(err).Fatalf("failed to load config file %q", *configPath)
		}
		if err := tree.Unmarshal(&config); err != nil {
			log.G(ctx).WithError(err).Fatalf("failed to parse config file %q", *configPath)
		}
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*rootDir, "stargz"), config,
		stargzfs.WithGetSources(source.FromDefaultLabels(registryHosts)))
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to configure filesystem")
	}
	rs, err := snbase.NewSnapshotter(ctx, filepath.Join(*rootDir, "snapshotter"), fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to configure snapshotter")
	}
	defer rs.Close()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to create directory for %q", *address)
	}
	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to remove %q", *address)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("listen on %q", *address)
	}
	go func() {
		if err := rpc.Serve(l); err != nil {
			log.G(ctx).WithError(err).Fatalf("serve on %q", *address)
		}
	}()
	log.G(ctx).WithField("address", *address).Info("serving")
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	<-c
	log.G(ctx).Info("exiting")
	rpc.Stop()
}

// registryHosts: the image's own host, plain HTTP for loopback, HTTPS otherwise (no auth).
func registryHosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	host := ref.Hostname()
	client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	h := docker.RegistryHost{
		Client:       client,
		Host:         host,
		Scheme:       "https",
		Path:         "/v2",
		Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
	}
	if localhost, _ := docker.MatchLocalhost(host); localhost {
		h.Scheme = "http"
	}
	if host == "docker.io" {
		h.Host = "registry-1.docker.io"
	}
	return []docker.RegistryHost{h}, nil
}
