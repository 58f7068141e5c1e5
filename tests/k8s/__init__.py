"""A fake Kubernetes API server and a cluster interface with a fake and a real implementation."""
