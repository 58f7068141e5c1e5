"""Adding the sidecar to any workload (SPEC section 12): `pod` decides what a pod gets (pure,
plain dicts), `manifests` applies it to YAML streams (`sidecar inject`), `webhook` to Pods at
admission (`sidecar webhook`). Nothing here is imported by `sidecar run`."""
