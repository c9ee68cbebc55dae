"""Running jobs on a Ray cluster from outside it: job packages (`submission`), Ray's Jobs API
(`jobs`, the only module that talks to it) and KubeRay manifests (`kuberay`). Never joins the cluster as a driver."""
