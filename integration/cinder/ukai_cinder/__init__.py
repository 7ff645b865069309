"""OpenStack Cinder volume driver for ukai (distributed local storage for
VM disk images). The driver speaks ukai's control API (HTTP/JSON, /v1) and
hands out iSCSI connections to the ukai node on the hypervisor's host."""
