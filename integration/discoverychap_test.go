package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDiscoveryCHAP: a node with iscsi.discovery_chap answers discovery
// (iscsi-ls) only with those credentials; a login to an unknown image and
// one to an image the initiator is not on the export list of fail alike,
// and the node logs the true reasons.
func TestDiscoveryCHAP(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "disc.secret")
	os.WriteFile(secret, []byte("discoverysecret1\n"), 0o600)
	n := newClusterNode(t, "n1", clusterOpts{requireACL: true})
	cfg, _ := os.ReadFile(n.cfgPath)
	s := strings.Replace(string(cfg), "  require_acl: true\n", "  require_acl: true\n  discovery_chap:\n    user: disc\n    secret_file: "+secret+"\n", 1)
	os.WriteFile(n.cfgPath, []byte(s), 0o600)
	n.start()
	const ini = "iqn.2026-11.test:hv1"
	n.mustCLI("image", "create", "vm1", "--size", "1M")
	n.mustCLI("image", "export", "vm1", "--initiator", ini)

	ls := func(cred string) (string, error) {
		return run(t, 30*time.Second, "iscsi-ls", "-i", ini, "iscsi://"+cred+n.portal)
	}
	if out, err := ls("disc%discoverysecret1@"); err != nil || !strings.Contains(out, n.prefix+":vm1") {
		t.Fatalf("discovery with the right CHAP: %v\n%s", err, out)
	}
	for _, cred := range []string{"", "disc%wrongsecret000@"} {
		if out, err := ls(cred); err == nil || strings.Contains(out, ":vm1") {
			t.Errorf("discovery with credentials %q: %v\n%s", cred, err, out)
		}
	}
	// The image itself needs no CHAP for its initiator.
	if out, err := run(t, 30*time.Second, "iscsi-inq", "-i", ini, n.url("vm1")); err != nil {
		t.Fatalf("login to vm1: %v\n%s", err, out)
	}
	// Unknown image and an initiator off the list: the same failure.
	outs := map[string]string{}
	for name, args := range map[string][]string{
		"unknown image":   {"-i", ini, "iscsi://hv1%somesecret0001@" + n.portal + "/" + n.prefix + ":nosuch/0"},
		"not on the list": {"-i", "iqn.2026-11.test:intruder", "iscsi://hv1%somesecret0001@" + n.portal + "/" + n.prefix + ":vm1/0"},
	} {
		out, err := run(t, 30*time.Second, "iscsi-inq", args...)
		if err == nil {
			t.Fatalf("%s: logged in\n%s", name, out)
		}
		outs[name] = strings.ReplaceAll(out, ":nosuch", ":vm1")
	}
	if outs["unknown image"] != outs["not on the list"] {
		t.Errorf("refusals differ:\nunknown image: %s\nnot on the list: %s", outs["unknown image"], outs["not on the list"])
	}
	logs := n.logs.String()
	for _, r := range []string{"unknown target", "initiator not on the export list"} {
		if !strings.Contains(logs, r) {
			t.Errorf("reason %q not in the node's log", r)
		}
	}
	if strings.Contains(logs, "discoverysecret1") {
		t.Error("the node's log holds the discovery secret")
	}
}
