package integration

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

// A secured cluster: mutual TLS between nodes, an API token, HTTPS for the
// API, CHAP and initiator access lists on the targets.
// securedCluster starts nodes with everything on: mutual TLS between
// them, an API over HTTPS with a bearer token, access lists (CHAP secrets
// may be stored in Consul). It returns the nodes, the PKI directory and
// the token file.
func securedCluster(t *testing.T, names []string, labels []map[string]string, more ...string) (nodes []*node, pki, token string) {
	t.Helper()
	dir := t.TempDir()
	pki = filepath.Join(dir, "pki")
	if out, err := exec.Command(ukaiBin, "tls", "init", "--dir", pki).CombinedOutput(); err != nil {
		t.Fatalf("tls init: %v %s", err, out)
	}
	for _, n := range names {
		if out, err := exec.Command(ukaiBin, "tls", "issue", n, "--dir", pki, "--host", "127.0.0.1").CombinedOutput(); err != nil {
			t.Fatalf("tls issue: %v %s", err, out)
		}
	}
	token = filepath.Join(dir, "token")
	os.WriteFile(token, []byte("s3cret-cluster-token\n"), 0o600)
	consul := consultest.Start(t, consultest.Persistent(t.TempDir()))
	for i, name := range names {
		extra := "tls:\n  ca: " + filepath.Join(pki, "ca.pem") + "\n  cert: " + filepath.Join(pki, name+".pem") + "\n  key: " + filepath.Join(pki, name+"-key.pem") + "\n" + strings.Join(more, "")
		var join []string
		if i > 0 {
			join = []string{nodes[0].gossip}
		}
		o := clusterOpts{consul: consul.Addr, join: join, requireACL: true, extra: extra}
		if i < len(labels) {
			o.labels = labels[i]
		}
		n := newClusterNode(t, name, o)
		// The API with a token over HTTPS; CHAP secrets may be stored in Consul.
		cfg, _ := os.ReadFile(n.cfgPath)
		s := strings.Replace(string(cfg), "api:\n  listen: "+n.api+"\n", "api:\n  listen: "+n.api+"\n  token_file: "+token+"\n  tls: true\n", 1)
		s = strings.Replace(s, "  require_acl: true\n", "  require_acl: true\n  chap_secret_store: consul\n", 1)
		os.WriteFile(n.cfgPath, []byte(s), 0o600)
		n.cliArgs = []string{"--ca", filepath.Join(pki, "ca.pem"), "--token-file", token}
		n.https = true
		n.start()
		nodes = append(nodes, n)
	}
	return nodes, pki, token
}

// qemuIOCHAP runs qemu-io commands on target through portal as initiator
// ini with one-way CHAP (user, secret) and fails t unless all of them work.
func qemuIOCHAP(t *testing.T, portal, target, ini, user, secret string, cmds ...string) {
	t.Helper()
	args := []string{"--object", "secret,id=s0,data=" + secret, "--image-opts"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, "driver=iscsi,transport=tcp,portal="+portal+",target="+target+",lun=0,initiator-name="+ini+",user="+user+",password-secret=s0")
	out, err := run(t, time.Minute, "qemu-io", args...)
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io with CHAP: %v\n%s", err, out)
	}
}

func TestSecuredCluster(t *testing.T) {
	nodes, pki, _ := securedCluster(t, []string{"n1", "n2"}, nil)
	dir := t.TempDir()
	n1, n2 := nodes[0], nodes[1]

	// The API: no token, no entry; nothing changes.
	out, errOut, err := n1.cliWith([]string{"--ca", filepath.Join(pki, "ca.pem")}, "image", "create", "x", "--size", "1M")
	if err == nil || !strings.Contains(errOut, "missing or invalid bearer token") {
		t.Fatalf("create without a token: %v %s %s", err, out, errOut)
	}
	if strings.Contains(n1.mustCLI("image", "list"), "x ") {
		t.Fatal("an unauthenticated request created an image")
	}

	// A replicated image over mutual TLS between the nodes.
	n1.mustCLI("image", "create", "sec", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	secretFile := filepath.Join(dir, "chap")
	os.WriteFile(secretFile, []byte("chap-secret-0123"), 0o600)
	const ini = "iqn.2026-11.test:hypervisor1"
	n1.mustCLI("image", "export", "sec", "--initiator", ini, "--chap-user", "hv1", "--chap-secret-file", secretFile)
	if info := n1.mustCLI("image", "info", "sec", "-o", "json"); strings.Contains(info, "chap-secret-0123") {
		t.Fatal("image info prints the CHAP secret")
	}
	url := func(user, pass string) string {
		cred := ""
		if user != "" {
			cred = user + "%" + pass + "@"
		}
		return "iscsi://" + cred + n1.portal + "/" + n1.prefix + ":sec/0"
	}
	if out, err := run(t, 30*time.Second, "iscsi-inq", "-i", ini, url("hv1", "chap-secret-0123")); err != nil {
		t.Fatalf("right CHAP credentials refused: %v %s", err, out)
	}
	for name, args := range map[string][]string{
		"wrong secret":    {"-i", ini, url("hv1", "wrong-secret-000")},
		"wrong user":      {"-i", ini, url("hv2", "chap-secret-0123")},
		"missing secret":  {"-i", ini, url("", "")},
		"not on the list": {"-i", "iqn.2026-11.test:intruder", url("hv1", "chap-secret-0123")},
	} {
		if out, err := run(t, 30*time.Second, "iscsi-inq", args...); err == nil {
			t.Errorf("%s: logged in:\n%s", name, out)
		}
	}
	if !strings.Contains(n1.logs.String(), "iscsi login refused") {
		t.Error("refused logins are not logged")
	}
	// Discovery shows an initiator only what it may log in to.
	n1.mustCLI("image", "create", "other", "--size", "1M")
	ls, _ := run(t, 30*time.Second, "iscsi-ls", "-i", ini, "iscsi://"+n1.portal)
	if !strings.Contains(ls, ":sec") || strings.Contains(ls, ":other") {
		t.Fatalf("discovery for %s:\n%s", ini, ls)
	}
	ls, _ = run(t, 30*time.Second, "iscsi-ls", "-i", "iqn.2026-11.test:intruder", "iscsi://"+n1.portal)
	if strings.Contains(ls, ":sec") {
		t.Fatalf("discovery shows an unexported image to a stranger:\n%s", ls)
	}
	// I/O with CHAP through QEMU, replicated over mutual TLS.
	qemuCHAP := func(portal string, cmds ...string) {
		t.Helper()
		qemuIOCHAP(t, portal, n1.prefix+":sec", ini, "hv1", "chap-secret-0123", cmds...)
	}
	qemuCHAP(n1.portal, "write -P 0x5e 0 4M", "flush")
	if l := locations(t, n1, "sec"); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("replication over mutual TLS left copies out of sync: %v", l)
	}
	qemuCHAP(n2.portal, "read -P 0x5e 0 4M")
	if out := n1.mustCLI("image", "verify", "sec"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}

	// iscsi-test-cu with CHAP on: the suites of gotgt's CI list that use
	// one initiator pass as without CHAP.
	for _, suite := range []string{"ALL.Read10", "ALL.Write10", "ALL.Verify10", "ALL.Unmap", "ALL.WriteSame16", "ALL.iSCSITMF", "ALL.iSCSIcmdsn"} {
		out, err := runWithTimeout(exec.Command("iscsi-test-cu", "-d", "-s", "-i", ini, "--test="+suite, url("hv1", "chap-secret-0123")), 2*time.Minute)
		m := summaryRE.FindStringSubmatch(out)
		if err != nil || m == nil || m[2] == "0" || m[4] != "0" {
			t.Errorf("iscsi-test-cu %s with CHAP: %v\n%s", suite, err, lastLines(out, 8))
		}
	}

	// The data transport: a client without a certificate, or with one
	// from another CA, is refused on every endpoint.
	otherPKI := filepath.Join(dir, "other")
	exec.Command(ukaiBin, "tls", "init", "--dir", otherPKI).Run()
	exec.Command(ukaiBin, "tls", "issue", "evil", "--dir", otherPKI).Run()
	peerAddr := n2.peer
	noCert := &tls.Config{InsecureSkipVerify: true}
	otherCA, err := tlsutil.Files{CA: filepath.Join(pki, "ca.pem"), Cert: filepath.Join(otherPKI, "evil.pem"), Key: filepath.Join(otherPKI, "evil-key.pem")}.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	for name, conf := range map[string]*tls.Config{"no certificate": noCert, "another CA": otherCA} {
		// The block protocol (ALPN ukai-blk/1): block I/O, forwarded I/O,
		// ping.
		pc := peer.NewClient(peerAddr, peer.ClientConfig{TLS: conf, Timeout: 5 * time.Second})
		ref := peer.Ref{ID: strings.Repeat("0", 32), Gen: 1}
		ctx := context.Background()
		for op, err := range map[string]error{
			"write":         pc.WriteAt(ctx, ref, make([]byte, 4096), 0, false),
			"read":          pc.ReadAt(ctx, ref, make([]byte, 4096), 0),
			"forward write": pc.ForwardWrite(ctx, ref, make([]byte, 4096), 0, false),
		} {
			if !errors.Is(err, peer.ErrUnavailable) {
				t.Errorf("%s: block protocol %s: %v, want refused", name, op, err)
			}
		}
		if _, err := pc.Ping(ctx); err == nil {
			t.Errorf("%s: block protocol ping answered", name)
		}
		pc.Close()
		// The HTTP/2 side: streamed checksums and ranges.
		for _, path := range []string{"/peer/v1/checksums", "/peer/v1/range"} {
			c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: conf}}
			req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, "https://"+peerAddr+path, nil)
			if resp, err := c.Do(req); err == nil {
				resp.Body.Close()
				t.Errorf("%s: %s answered %d", name, path, resp.StatusCode)
			}
		}
		// Cleartext is refused too, on both protocols.
		plain := peer.NewClient(peerAddr, peer.ClientConfig{Timeout: 5 * time.Second})
		if err := plain.WriteAt(context.Background(), peer.Ref{ID: strings.Repeat("0", 32), Gen: 1}, make([]byte, 4096), 0, false); !errors.Is(err, peer.ErrUnavailable) {
			t.Errorf("cleartext block protocol write: %v, want refused", err)
		}
		plain.Close()
		if resp, err := http.Get("http://" + peerAddr + "/peer/v1/range"); err == nil && resp.StatusCode < 400 {
			t.Errorf("cleartext request to the data transport answered %d", resp.StatusCode)
		}
	}
}

// api.pprof: true serves the profiler behind the API token like every
// other path: without the token it answers 401.
func TestPprofNeedsToken(t *testing.T) {
	n := newClusterNode(t, "n1", clusterOpts{extra: ""})
	token := filepath.Join(n.dir, "token")
	if err := os.WriteFile(token, []byte("pprof-test-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _ := os.ReadFile(n.cfgPath)
	s := strings.Replace(string(cfg), "api:\n  listen: "+n.api+"\n", "api:\n  listen: "+n.api+"\n  token_file: "+token+"\n  pprof: true\n", 1)
	if s == string(cfg) {
		t.Fatal("config not rewritten")
	}
	os.WriteFile(n.cfgPath, []byte(s), 0o600)
	n.cliArgs = []string{"--token-file", token}
	n.start()
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=2", "/debug/pprof/cmdline", "/debug/pprof/symbol"} {
		for _, auth := range []string{"", "Bearer wrong", "Bearer pprof-test-token"} {
			req, _ := http.NewRequest(http.MethodGet, "http://"+n.api+path, nil)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			want := http.StatusUnauthorized
			if auth == "Bearer pprof-test-token" {
				want = http.StatusOK
			}
			if resp.StatusCode != want {
				t.Errorf("GET %s with %q: %d, want %d", path, auth, resp.StatusCode, want)
			}
		}
	}
}
