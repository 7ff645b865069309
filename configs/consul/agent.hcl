# /etc/consul.d/agent.hcl: a Consul client agent on a ukai node (example).
# The servers (3 or 5, on their own machines or on storage nodes with
# server = true and bootstrap_expect) hold the data; ukai's per-node
# session, its locks and its watches go through this agent.
datacenter = "dc1"
data_dir   = "/var/lib/consul"
server     = false
# The address other agents reach this one at (the storage network).
bind_addr   = "10.0.0.11"
client_addr = "127.0.0.1"  # ukai's consul.address: 127.0.0.1:8500
retry_join  = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
encrypt     = "REPLACE-WITH-consul-keygen-OUTPUT"
acl {
  enabled        = true
  default_policy = "deny"
  # ukai's token (consul.token_file) needs key_prefix "ukai/" write and
  # session_prefix "" write: docs/security.md.
}
# ukai's owner.lease_ttl (default 10s) must not be below the servers'
# session_ttl_min (10s unless lowered there).
