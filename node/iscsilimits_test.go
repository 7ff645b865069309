package node

import (
	"strings"
	"testing"
	"time"
)

// The portal's resource bounds have defaults, reach the iSCSI server, and
// are refused out of range with the key named.
func TestISCSILimitsConfig(t *testing.T) {
	dir := t.TempDir()
	ok := "node:\n  name: n1\n  data_dir: " + dir + "\n"
	c, err := LoadConfig(writeCfg(t, ok), nil)
	if err != nil {
		t.Fatal(err)
	}
	ic := c.ISCSI.iscsiConfig()
	if ic.MaxConnections != 4096 || ic.MaxConnectionsPerAddress != 512 || ic.LoginTimeout != 15*time.Second ||
		ic.DataOutTimeout != 30*time.Second || ic.SessionWriteBuffer != 64<<20 || ic.WriteBuffer != 1<<30 || ic.ResponseQueue != 16<<20 {
		t.Fatalf("defaults: %+v", ic)
	}
	c, err = LoadConfig(writeCfg(t, ok+"iscsi:\n  max_connections: 10\n  max_connections_per_address: 5\n  data_out_timeout: 5s\n  session_write_buffer_mib: 48\n  write_buffer_mib: 96\n  response_queue_mib: 2\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ic = c.ISCSI.iscsiConfig()
	if ic.MaxConnections != 10 || ic.MaxConnectionsPerAddress != 5 || ic.DataOutTimeout != 5*time.Second || ic.SessionWriteBuffer != 48<<20 || ic.WriteBuffer != 96<<20 || ic.ResponseQueue != 2<<20 {
		t.Fatalf("configured: %+v", ic)
	}
	for _, tc := range []struct{ body, want string }{
		{"iscsi:\n  max_connections: 0\n", "iscsi.max_connections"},
		{"iscsi:\n  max_connections: 8\n  max_connections_per_address: 9\n", "iscsi.max_connections_per_address"},
		{"iscsi:\n  login_timeout: 10ms\n", "iscsi.login_timeout"},
		{"iscsi:\n  data_out_timeout: 0s\n", "iscsi.data_out_timeout"},
		{"iscsi:\n  session_write_buffer_mib: 16\n", "iscsi.session_write_buffer_mib"},
		{"iscsi:\n  write_buffer_mib: 32\n", "iscsi.write_buffer_mib"},
		{"iscsi:\n  response_queue_mib: 0\n", "iscsi.response_queue_mib"},
	} {
		_, err := LoadConfig(writeCfg(t, ok+tc.body), nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
}
