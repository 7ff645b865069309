package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := NewRoot("test")
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestTLSInitIssue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	out, err := run(t, "tls", "init", "--dir", dir, "--name", "test CA")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"test CA"`, filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem") + " (mode 0600)", "ukai tls issue NODE --dir " + dir} {
		if !strings.Contains(out, want) {
			t.Errorf("init output lacks %q:\n%s", want, out)
		}
	}
	if m := fileMode(t, filepath.Join(dir, "ca-key.pem")); m != 0o600 {
		t.Errorf("CA key mode %04o", m)
	}
	if _, err := run(t, "tls", "init", "--dir", dir); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second init: %v", err)
	}
	if _, err := run(t, "tls", "init"); err == nil || !strings.Contains(err.Error(), "dir") {
		t.Errorf("init without --dir: %v", err)
	}

	out, err = run(t, "tls", "issue", "n1", "--dir", dir, "--host", "10.0.0.1", "--host", "n1.example.org,127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ca, cert, key := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "n1.pem"), filepath.Join(dir, "n1-key.pem")
	for _, want := range []string{
		"for 10.0.0.1, 127.0.0.1, n1.example.org, n1.",
		"tls:\n  ca: " + ca + "\n  cert: " + cert + "\n  key: " + key + "\n",
		"ukai --ca " + ca + " --api 10.0.0.1:7700",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("issue output lacks %q:\n%s", want, out)
		}
	}
	if m := fileMode(t, key); m != 0o600 {
		t.Errorf("node key mode %04o", m)
	}
	if _, err := (tlsutil.Files{CA: ca, Cert: cert, Key: key}).ServerConfig(); err != nil {
		t.Errorf("issued files do not load: %v", err)
	}
	if _, err := run(t, "tls", "issue", "n1", "--dir", dir); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second issue: %v", err)
	}
	if _, err := run(t, "tls", "issue", "n2", "--dir", t.TempDir()); err == nil {
		t.Error("issue without a CA succeeded")
	}
}

// recorder serves /v1/version and /v1/stats and records the Authorization
// headers it gets.
type recorder struct {
	mu   sync.Mutex
	auth []string
}

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.auth = append(r.auth, req.Header.Get("Authorization"))
	r.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(api.Version{Version: "srv", API: "v1"})
}

func (r *recorder) last() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.auth) == 0 {
		return "<none>"
	}
	return r.auth[len(r.auth)-1]
}

func writeToken(t *testing.T, tok string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(tok), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestClientToken(t *testing.T) {
	rec := &recorder{}
	srv := httptest.NewServer(rec)
	defer srv.Close()
	ctx := context.Background()
	const secret = "s3cret-token-value"

	t.Setenv("UKAI_TOKEN", "")
	a := &app{apiAddr: srv.URL}
	if _, err := a.client().Stats(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rec.last(); got != "" {
		t.Errorf("no token configured, sent %q", got)
	}

	t.Setenv("UKAI_TOKEN", " env-token\n")
	if _, err := a.client().Stats(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rec.last(); got != "Bearer env-token" {
		t.Errorf("UKAI_TOKEN: sent %q", got)
	}

	// The file wins over the environment.
	a.tokenFile = writeToken(t, secret+"\n", 0o600)
	if _, err := a.client().Stats(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rec.last(); got != "Bearer "+secret {
		t.Errorf("--token-file: sent %q", got)
	}

	// Refused: world-readable, empty, missing, or not a token.
	n := len(rec.auth)
	for name, path := range map[string]string{
		"world-readable": writeToken(t, secret, 0o644),
		"empty":          writeToken(t, "\n", 0o600),
		"missing":        filepath.Join(t.TempDir(), "nope"),
		"spaces":         writeToken(t, secret+" "+secret, 0o600),
	} {
		a.tokenFile = path
		_, err := a.client().Stats(ctx)
		if err == nil {
			t.Errorf("%s token file accepted", name)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("%s: error shows the token: %v", name, err)
		}
		if name == "world-readable" && !strings.Contains(err.Error(), "chmod o-r") {
			t.Errorf("world-readable: %v", err)
		}
	}
	if len(rec.auth) != n {
		t.Error("a refused token file still sent a request")
	}
}

func TestClientFlagsAndCA(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, err := tlsutil.InitCA(dir, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := tlsutil.Issue(ca, caKey, dir, "n1", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	conf, err := tlsutil.Files{CA: ca, Cert: cert, Key: key}.ServerConfigClientCertOptional()
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	srv := httptest.NewUnstartedServer(rec)
	srv.TLS = conf
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	tokenFile := writeToken(t, "flag-token", 0o600)
	t.Setenv("UKAI_TOKEN", "")

	// Through the real flags: `ukai version` prints to the process's
	// stdout; what matters is what reached the server.
	if _, err := run(t, "version", "--api", addr, "--ca", ca, "--token-file", tokenFile); err != nil {
		t.Fatal(err)
	}
	if got := rec.last(); got != "Bearer flag-token" {
		t.Errorf("sent %q", got)
	}
	// Without --ca the node's certificate is not trusted.
	if _, err := run(t, "version", "--api", srv.URL, "--token-file", tokenFile); err == nil {
		t.Error("https without --ca succeeded")
	}
	if _, err := run(t, "version", "--api", addr, "--ca", filepath.Join(dir, "missing.pem")); err == nil || !strings.Contains(err.Error(), "--ca") {
		t.Errorf("missing CA file: %v", err)
	}
}
