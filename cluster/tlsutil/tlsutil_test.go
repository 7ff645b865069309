package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

type pki struct {
	dir, caCert, caKey string
}

func newPKI(t *testing.T) pki {
	t.Helper()
	dir := t.TempDir()
	c, k, err := InitCA(dir, "test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	return pki{dir, c, k}
}

func (p pki) node(t *testing.T, name string, hosts ...string) Files {
	t.Helper()
	c, k, err := Issue(p.caCert, p.caKey, p.dir, name, hosts, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return Files{CA: p.caCert, Cert: c, Key: k}
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("%s: no certificate", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestInitCAAndIssue(t *testing.T) {
	p := newPKI(t)
	if p.caCert != filepath.Join(p.dir, "ca.pem") || p.caKey != filepath.Join(p.dir, "ca-key.pem") {
		t.Fatalf("paths %s %s", p.caCert, p.caKey)
	}
	if m := mode(t, p.caKey); m != 0o600 {
		t.Errorf("CA key mode %04o, want 0600", m)
	}
	ca := readCert(t, p.caCert)
	if !ca.IsCA || ca.Subject.CommonName != "test CA" || ca.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("CA cert: IsCA=%v CN=%q alg=%v", ca.IsCA, ca.Subject.CommonName, ca.PublicKeyAlgorithm)
	}
	if _, _, err := InitCA(p.dir, "again", 0); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second InitCA: %v", err)
	}

	f := p.node(t, "n1")
	if f.Cert != filepath.Join(p.dir, "n1.pem") || f.Key != filepath.Join(p.dir, "n1-key.pem") {
		t.Fatalf("paths %s %s", f.Cert, f.Key)
	}
	if m := mode(t, f.Key); m != 0o600 {
		t.Errorf("node key mode %04o, want 0600", m)
	}
	leaf := readCert(t, f.Cert)
	if leaf.Subject.CommonName != "n1" || leaf.IsCA {
		t.Errorf("leaf CN=%q IsCA=%v", leaf.Subject.CommonName, leaf.IsCA)
	}
	if !slices.Equal(leaf.DNSNames, []string{"localhost", "n1"}) || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Errorf("default SANs: %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if leaf.NotAfter.After(time.Now().Add(time.Hour + time.Minute)) {
		t.Errorf("NotAfter %v beyond the requested hour", leaf.NotAfter)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{u}, DNSName: "n1"}); err != nil {
			t.Errorf("verify for usage %v: %v", u, err)
		}
	}
	if _, _, err := Issue(p.caCert, p.caKey, p.dir, "n1", nil, time.Hour); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Errorf("second Issue: %v", err)
	}

	f2 := p.node(t, "n2", "10.0.0.2", "::1", "n2.example.org")
	leaf2 := readCert(t, f2.Cert)
	if !slices.Equal(leaf2.DNSNames, []string{"n2.example.org", "n2"}) || len(leaf2.IPAddresses) != 2 {
		t.Errorf("SANs: %v %v", leaf2.DNSNames, leaf2.IPAddresses)
	}
	if err := leaf2.VerifyHostname("10.0.0.2"); err != nil {
		t.Error(err)
	}
	if err := leaf2.VerifyHostname("127.0.0.1"); err == nil {
		t.Error("explicit hosts still contain the default 127.0.0.1")
	}

	for _, bad := range []string{"", "../x", "a/b", "-n"} {
		if _, _, err := Issue(p.caCert, p.caKey, p.dir, bad, nil, time.Hour); err == nil {
			t.Errorf("node name %q accepted", bad)
		}
	}
	if _, _, err := Issue(p.caCert, p.caKey, p.dir, "n3", []string{"not a host!"}, time.Hour); err == nil {
		t.Error("bad host accepted")
	}
	// Never outlives the CA.
	f4, k4, err := Issue(p.caCert, p.caKey, p.dir, "n4", nil, 100*365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_ = k4
	if l := readCert(t, f4); l.NotAfter.After(ca.NotAfter) {
		t.Errorf("leaf NotAfter %v after CA's %v", l.NotAfter, ca.NotAfter)
	}
}

func TestIssueRefusesWorldReadableCAKey(t *testing.T) {
	p := newPKI(t)
	if err := os.Chmod(p.caKey, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := Issue(p.caCert, p.caKey, p.dir, "n1", nil, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "chmod o-r") {
		t.Fatalf("Issue with world-readable CA key: %v", err)
	}
}

// handshake runs a TLS connection over loopback and reports the server's
// and the client's errors (the client's includes a first read: with TLS
// 1.3 a client learns that its certificate was refused only then).
func handshake(t *testing.T, server, client *tls.Config) (serverErr, clientErr error, peer string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		err  error
		peer string
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, server)
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		cs := tc.ConnectionState()
		_, err = tc.Write([]byte("x"))
		done <- result{err: err, peer: PeerNode(&cs)}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, client)
	clientErr = tc.Handshake()
	if clientErr == nil {
		_, clientErr = tc.Read(make([]byte, 1))
	}
	r := <-done
	return r.err, clientErr, r.peer
}

func configs(t *testing.T, server, client Files, serverName string) (*tls.Config, *tls.Config) {
	t.Helper()
	s, err := server.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.ClientConfig(serverName)
	if err != nil {
		t.Fatal(err)
	}
	return s, c
}

func TestMutualTLS(t *testing.T) {
	p := newPKI(t)
	n1, n2 := p.node(t, "n1"), p.node(t, "n2")
	for _, name := range []string{"", "n1", "127.0.0.1", "localhost"} {
		s, c := configs(t, n1, n2, name)
		if s.MinVersion != tls.VersionTLS13 || c.MinVersion != tls.VersionTLS13 {
			t.Fatal("TLS 1.3 minimum not set")
		}
		se, ce, peer := handshake(t, s, c)
		if se != nil || ce != nil {
			t.Fatalf("serverName %q: server %v, client %v", name, se, ce)
		}
		if peer != "n2" {
			t.Errorf("server saw client %q, want n2", peer)
		}
	}
	// A name the server's certificate does not carry.
	s, c := configs(t, n1, n2, "n2")
	if _, ce, _ := handshake(t, s, c); ce == nil {
		t.Error("client accepted a server certificate for another name")
	}
}

func TestServerRefusesForeignClientCert(t *testing.T) {
	p, other := newPKI(t), newPKI(t)
	n1 := p.node(t, "n1")
	intruder := other.node(t, "n2")
	intruder.CA = p.caCert // trusts our server, but its cert is from another CA
	s, c := configs(t, n1, intruder, "")
	se, ce, _ := handshake(t, s, c)
	if se == nil || ce == nil {
		t.Fatalf("foreign client certificate accepted: server %v, client %v", se, ce)
	}
}

func TestClientRefusesForeignServer(t *testing.T) {
	p, other := newPKI(t), newPKI(t)
	impostor := other.node(t, "n1")
	impostor.CA = p.caCert
	n2 := p.node(t, "n2")
	for _, name := range []string{"", "n1"} {
		s, c := configs(t, impostor, n2, name)
		if _, ce, _ := handshake(t, s, c); ce == nil {
			t.Errorf("serverName %q: client accepted a server from another CA", name)
		}
	}
}

func TestServerRequiresClientCert(t *testing.T) {
	p := newPKI(t)
	n1 := p.node(t, "n1")
	s, c := configs(t, n1, Files{CA: p.caCert}, "")
	se, ce, _ := handshake(t, s, c)
	if se == nil || ce == nil {
		t.Fatalf("no client certificate accepted: server %v, client %v", se, ce)
	}
	// The optional variant serves a CA-only client...
	opt, err := n1.ServerConfigClientCertOptional()
	if err != nil {
		t.Fatal(err)
	}
	if se, ce, peer := handshake(t, opt, c); se != nil || ce != nil || peer != "" {
		t.Fatalf("optional: server %v, client %v, peer %q", se, ce, peer)
	}
	// ...but still refuses a certificate from another CA.
	other := newPKI(t)
	intruder := other.node(t, "n2")
	intruder.CA = p.caCert
	_, ic := configs(t, n1, intruder, "")
	if se, ce, _ := handshake(t, opt, ic); se == nil || ce == nil {
		t.Fatalf("optional accepted a foreign client certificate: server %v, client %v", se, ce)
	}
}

func TestExpiredRefused(t *testing.T) {
	p := newPKI(t)
	n1 := p.node(t, "n1")
	past := time.Now().Add(-48 * time.Hour)
	c, k, err := issue(p.caCert, p.caKey, p.dir, "old", nil, past, past.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	old := Files{CA: p.caCert, Cert: c, Key: k}
	if _, err := old.ServerConfig(); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("ServerConfig with an expired certificate: %v", err)
	}
	if _, err := old.ClientConfig(""); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("ClientConfig with an expired certificate: %v", err)
	}
	// Presented anyway (loaded by hand), it is refused both ways.
	pair, err := tls.LoadX509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	s, cl := configs(t, n1, n1, "")
	cl.Certificates = []tls.Certificate{pair}
	if se, ce, _ := handshake(t, s, cl); se == nil || ce == nil {
		t.Errorf("expired client certificate accepted: server %v, client %v", se, ce)
	}
	s, cl = configs(t, n1, n1, "")
	s.Certificates = []tls.Certificate{pair}
	if _, ce, _ := handshake(t, s, cl); ce == nil {
		t.Error("expired server certificate accepted")
	}
}

func TestCheckSecretFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token")
	if err := os.WriteFile(path, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, m := range []os.FileMode{0o600, 0o400, 0o640} {
		os.Chmod(path, m)
		if err := CheckSecretFile(path); err != nil {
			t.Errorf("mode %04o: %v", m, err)
		}
	}
	for _, m := range []os.FileMode{0o644, 0o604, 0o666} {
		os.Chmod(path, m)
		err := CheckSecretFile(path)
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "chmod o-r") {
			t.Errorf("mode %04o: %v", m, err)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Error("error shows the secret")
		}
	}
	if err := CheckSecretFile(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file accepted")
	}
	if err := CheckSecretFile(dir); err == nil {
		t.Error("directory accepted")
	}
	// Loading a node's key goes through it.
	p := newPKI(t)
	n1 := p.node(t, "n1")
	os.Chmod(n1.Key, 0o644)
	if _, err := n1.ServerConfig(); err == nil || !strings.Contains(err.Error(), "chmod o-r") {
		t.Errorf("ServerConfig with a world-readable key: %v", err)
	}
	if _, err := n1.ClientConfig(""); err == nil || !strings.Contains(err.Error(), "chmod o-r") {
		t.Errorf("ClientConfig with a world-readable key: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	p := newPKI(t)
	n1 := p.node(t, "n1")
	if _, err := (Files{Cert: n1.Cert, Key: n1.Key}).ServerConfig(); err == nil {
		t.Error("server without CA accepted")
	}
	if _, err := (Files{CA: p.caCert}).ServerConfig(); err == nil {
		t.Error("server without certificate accepted")
	}
	if _, err := (Files{CA: p.caCert, Cert: n1.Cert}).ClientConfig(""); err == nil {
		t.Error("client with a certificate and no key accepted")
	}
	if _, err := (Files{CA: n1.Key}).ClientConfig(""); err == nil {
		t.Error("a key file as CA accepted")
	}
}
