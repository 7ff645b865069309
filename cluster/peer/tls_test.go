package peer

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// selfSigned returns a certificate for 127.0.0.1 usable by both ends.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ukai-peer-test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

func TestTLS(t *testing.T) {
	ctx := context.Background()
	cert, pool := selfSigned(t)
	st := newStore()
	ref, _ := st.addFile(t, 4<<20, 1<<20)
	s, addr := startServer(t, st, ServerConfig{TLS: &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}})
	c := newClient(t, addr, ClientConfig{TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}})
	data := randBytes(1 << 20)
	if err := c.WriteAt(ctx, ref, data, 0, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, ref, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	if err := c.ReadRange(ctx, ref, 0, 4, func(int64, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
	// One block protocol connection (ALPN ukai-blk/1) and one HTTP/2
	// connection (the streamed range).
	if n := s.accepted.Load(); n != 2 {
		t.Fatalf("%d connections, want 2", n)
	}
	// A client without a certificate is refused; a cleartext one too.
	bad := newClient(t, addr, ClientConfig{TLS: &tls.Config{RootCAs: pool}, Timeout: 2 * time.Second})
	wantErr(t, bad.Sync(ctx, ref), ErrUnavailable)
	plain := newClient(t, addr, ClientConfig{Timeout: 2 * time.Second})
	wantErr(t, plain.Sync(ctx, ref), ErrUnavailable)
}
