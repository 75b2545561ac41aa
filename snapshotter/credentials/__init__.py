"""Registry credentials for lazy pulls in Kubernetes (docs/credentials.md).

containerd never hands the CRI pull's credentials (``PullImageRequest.auth``, from the pod's
imagePullSecrets) to a proxy snapshotter, so a private remora image could not be mounted lazily.
This package supplies them the ways stargz-snapshotter and Nydus do:

* :mod:`.store`: an in-memory store, scoped per registry host + repository, with expiry;
* :mod:`.criproxy`: a CRI gRPC pass-through that kubelet talks to (``--image-service-endpoint``),
  which records each PullImage's auth in the store before containerd sees the pull;
* :mod:`.kubesecrets`: ``kubernetes.io/dockerconfigjson`` secrets read by reference from the API server;
* :mod:`.credprovider`: kubelet's credential-provider exec plugin (``remora credential-provider``);
* :mod:`.resolver`: the order the snapshotter consults them in for one image.
"""
