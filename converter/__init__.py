"""`remora convert`: turn an OCI image into a lazy-loadable remora image."""
