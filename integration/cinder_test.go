package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// python is Debian's interpreter, which sees python3-cinder (a python3
// on PATH may be a shim that does not).
const python = "/usr/bin/python3"

// TestCinderDriverEndToEnd runs integration/cinder/e2e: Cinder's volume
// manager with the ukai driver against this secured two-node cluster
// (TLS API with a token, access lists, CHAP secrets in Consul), the nodes
// labelled with the hypervisor host they stand for.
func TestCinderDriverEndToEnd(t *testing.T) {
	// Follow the VM is the locality policy: its delay is short here.
	nodes, pki, token := securedCluster(t, []string{"n1", "n2"},
		[]map[string]string{{"host": "hv1"}, {"host": "hv2"}}, "placement:\n  locality_delay: 3s\n")
	var apis []string
	for _, n := range nodes {
		apis = append(apis, "https://"+n.api)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "-m", "unittest", "-v", "e2e.test_e2e")
	cmd.Dir = filepath.Join("cinder")
	cmd.Env = append(os.Environ(),
		"PYTHONPATH="+cmd.Dir,
		"UKAI_E2E_API="+strings.Join(apis, ","),
		"UKAI_E2E_TOKEN_FILE="+token,
		"UKAI_E2E_CA="+filepath.Join(pki, "ca.pem"),
		"UKAI_E2E_HOSTS=hv1,hv2",
	)
	out, err := cmd.CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		for _, n := range nodes {
			t.Logf("%s log:\n%s", n.name, n.logs)
		}
		t.Fatalf("the Cinder end-to-end test failed: %v", err)
	}
	if !strings.Contains(string(out), "Ran 3 tests") || !strings.Contains(string(out), "\nOK") {
		t.Fatalf("the Cinder end-to-end test did not run its three tests cleanly:\n%s", out)
	}
}
