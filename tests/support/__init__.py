"""What the tests share: generated images and results, the tests' model, clusters, jobs, and the
validation of Kubernetes manifests against the real schemas. Helpers only: no test lives here."""
