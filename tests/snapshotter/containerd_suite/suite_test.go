// containerd's own snapshotter conformance suite (snapshots/testsuite) run against the remora
// snapshotter through containerd's proxy client: the exact client code containerd uses for
// proxy_plugins. Each sub-test gets a fresh snapshotter process on its own root.
//
// Built in GOPATH mode against Debian's golang-github-containerd-containerd-dev sources
// (see tests/snapshotter/test_containerd_suite.py). The server command comes as a JSON argv in
// REMORA_SNAPSHOTTER_CMD; --root and --address are appended.
package remorasuite

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	var argv []string
	if err := json.Unmarshal([]byte(os.Getenv("REMORA_SNAPSHOTTER_CMD")), &argv); err != nil || len(argv) == 0 {
		return nil, nil, fmt.Errorf("REMORA_SNAPSHOTTER_CMD must be a JSON argv: %v", err)
	}
	sock := filepath.Join(filepath.Dir(root), "snapshotter.sock")
	logf, err := os.Create(filepath.Join(os.Getenv("REMORA_SUITE_LOGS"), filepath.Base(filepath.Dir(root))+".log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(argv[0], append(argv[1:], "--root", root, "--address", sock, "--log-level", "info")...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stop := func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			logf.Close()
			return err
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
			logf.Close()
			return fmt.Errorf("snapshotter did not stop on SIGTERM")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("snapshotter socket %s not ready: %v (log: %s)", sock, err, logf.Name())
		}
		select {
		case werr := <-done:
			logf.Close()
			out, _ := os.ReadFile(logf.Name())
			return nil, nil, fmt.Errorf("snapshotter exited before serving (%v):\n%s", werr, out)
		case <-time.After(50 * time.Millisecond):
		}
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "remora")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

func TestRemoraSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, "remora", newSnapshotter)
}
