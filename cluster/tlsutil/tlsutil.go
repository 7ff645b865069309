// Package tlsutil makes and loads the certificates a ukai cluster uses: one
// cluster CA (ECDSA P-256) that signs one certificate per node. A node's
// certificate is used both ways between nodes (server and client auth), so
// peers authenticate each other with mutual TLS; operators' tools only need
// the CA certificate to verify a node.
//
// Files written:
//
//	ca.pem          CA certificate (0644)
//	ca-key.pem      CA private key (0600) — keep it off the nodes if you can
//	NODE.pem        node certificate (0644)
//	NODE-key.pem    node private key (0600)
//
// Keys are PKCS#8 PEM ("PRIVATE KEY"). Existing files are never overwritten.
package tlsutil

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Default validities, used when a validity of 0 is given.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultCertValidity = 2 * 365 * 24 * time.Hour
)

// File names inside the directory given to InitCA and Issue.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// DefaultHosts are the SANs of a node certificate issued without hosts.
var DefaultHosts = []string{"127.0.0.1", "localhost"}

// clockSkew backdates NotBefore so that a freshly issued certificate is
// accepted by a node whose clock is slightly behind.
const clockSkew = 5 * time.Minute

// InitCA creates a new cluster CA in dir (created 0700 if missing):
// ca.pem and ca-key.pem (0600). It refuses to overwrite either file.
func InitCA(dir string, name string, validity time.Duration) (certPath, keyPath string, err error) {
	if name == "" {
		name = "ukai cluster CA"
	}
	if validity == 0 {
		validity = DefaultCAValidity
	}
	if validity < 0 {
		return "", "", fmt.Errorf("CA validity %v: must be positive", validity)
	}
	now := time.Now()
	return initCA(dir, name, now.Add(-clockSkew), now.Add(validity))
}

func initCA(dir, name string, notBefore, notAfter time.Time) (string, string, error) {
	certPath := filepath.Join(dir, CACertFile)
	keyPath := filepath.Join(dir, CAKeyFile)
	if err := refuseExisting(certPath, keyPath); err != nil {
		return "", "", err
	}
	key, tmpl, err := newKeyAndTemplate("CA key", name, notBefore, notAfter)
	if err != nil {
		return "", "", err
	}
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	tmpl.IsCA = true
	tmpl.MaxPathLenZero = true // signs node certificates only
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", fmt.Errorf("create CA certificate: %w", err)
	}
	if err := writePair(dir, certPath, keyPath, der, key); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// Issue writes dir/NODE.pem and dir/NODE-key.pem (0600): a certificate for
// node signed by the CA in caCert/caKey, with CommonName node and the SANs
// hosts (IP addresses or DNS names; DefaultHosts when empty; the node name
// is added as a DNS name when it is a valid one). It is valid for server
// and client auth, and never outlives the CA. It refuses to overwrite
// existing files and to use a CA key readable by others.
func Issue(caCert, caKey, dir, node string, hosts []string, validity time.Duration) (certPath, keyPath string, err error) {
	if validity == 0 {
		validity = DefaultCertValidity
	}
	if validity < 0 {
		return "", "", fmt.Errorf("certificate validity %v: must be positive", validity)
	}
	now := time.Now()
	return issue(caCert, caKey, dir, node, hosts, now.Add(-clockSkew), now.Add(validity))
}

func issue(caCertPath, caKeyPath, dir, node string, hosts []string, notBefore, notAfter time.Time) (string, string, error) {
	if err := validNodeName(node); err != nil {
		return "", "", err
	}
	if err := CheckSecretFile(caKeyPath); err != nil {
		return "", "", err
	}
	ca, err := tls.LoadX509KeyPair(caCertPath, caKeyPath)
	if err != nil {
		return "", "", fmt.Errorf("load CA %s / %s: %w", caCertPath, caKeyPath, err)
	}
	caCert := ca.Leaf
	if caCert == nil {
		if caCert, err = x509.ParseCertificate(ca.Certificate[0]); err != nil {
			return "", "", fmt.Errorf("parse CA certificate %s: %w", caCertPath, err)
		}
	}
	if !caCert.IsCA {
		return "", "", fmt.Errorf("%s is not a CA certificate", caCertPath)
	}
	caSigner, ok := ca.PrivateKey.(crypto.Signer)
	if !ok {
		return "", "", fmt.Errorf("CA key %s cannot sign", caKeyPath)
	}
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	if time.Now().After(caCert.NotAfter) {
		return "", "", fmt.Errorf("CA %s expired on %s", caCertPath, caCert.NotAfter.Format(time.RFC3339))
	}

	if len(hosts) == 0 {
		hosts = DefaultHosts
	}
	var ips []net.IP
	var names []string
	seen := map[string]bool{}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if h == "" || seen[h] {
			continue
		}
		seen[h] = true
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
		} else if validDNSName(h) {
			names = append(names, h)
		} else {
			return "", "", fmt.Errorf("host %q: neither an IP address nor a DNS name", h)
		}
	}
	if validDNSName(node) && !seen[node] {
		names = append(names, node)
	}

	certPath := filepath.Join(dir, node+".pem")
	keyPath := filepath.Join(dir, node+"-key.pem")
	if err := refuseExisting(certPath, keyPath); err != nil {
		return "", "", err
	}
	key, tmpl, err := newKeyAndTemplate("key", node, notBefore, notAfter)
	if err != nil {
		return "", "", err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	tmpl.IPAddresses = ips
	tmpl.DNSNames = names
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caSigner)
	if err != nil {
		return "", "", fmt.Errorf("create certificate for %s: %w", node, err)
	}
	if err := writePair(dir, certPath, keyPath, der, key); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// newKeyAndTemplate makes a P-256 key and the certificate fields every
// ukai certificate shares (serial, subject, validity); what names the key
// in errors.
func newKeyAndTemplate(what, cn string, notBefore, notAfter time.Time) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate %s: %w", what, err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	return key, &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"ukai"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
	}, nil
}

// Files names a node's TLS material: the cluster CA certificate and the
// node's certificate and key.
type Files struct{ CA, Cert, Key string }

// ServerConfig is the mutual-TLS server side: it presents the node's
// certificate and requires a client certificate signed by the CA (TLS 1.3
// minimum).
func (f Files) ServerConfig() (*tls.Config, error) {
	return f.serverConfig(tls.RequireAndVerifyClientCert)
}

// ServerConfigClientCertOptional is ServerConfig for a listener that also
// serves clients without a certificate (an operator's CLI that only holds
// the CA certificate and authenticates by other means, such as a bearer
// token): a client certificate, when presented, must still be signed by
// the CA.
func (f Files) ServerConfigClientCertOptional() (*tls.Config, error) {
	return f.serverConfig(tls.VerifyClientCertIfGiven)
}

func (f Files) serverConfig(auth tls.ClientAuthType) (*tls.Config, error) {
	if f.Cert == "" || f.Key == "" {
		return nil, errors.New("TLS server: a certificate and a key are required (tls.cert, tls.key)")
	}
	pool, err := LoadCAPool(f.CA)
	if err != nil {
		return nil, err
	}
	cert, err := f.keyPair()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   auth,
	}, nil
}

// ClientConfig is the client side: it presents the node's certificate (if
// Cert and Key are set; leave both empty for a CA-only client) and
// verifies the server's certificate against the CA (TLS 1.3 minimum).
//
// With serverName set the server's certificate must also be valid for that
// name (a SAN: IP address or DNS name, and node certificates carry their
// node name as a DNS name). With serverName "" the server is trusted when
// its certificate chains to the cluster CA, is valid for server auth and
// has a CommonName (the node name): nodes are addressed by IP, which their
// certificate need not list.
func (f Files) ClientConfig(serverName string) (*tls.Config, error) {
	pool, err := LoadCAPool(f.CA)
	if err != nil {
		return nil, err
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool}
	switch {
	case f.Cert != "" && f.Key != "":
		cert, err := f.keyPair()
		if err != nil {
			return nil, err
		}
		conf.Certificates = []tls.Certificate{cert}
	case f.Cert != "" || f.Key != "":
		return nil, errors.New("TLS client: give both a certificate and a key, or neither")
	}
	if serverName != "" {
		conf.ServerName = serverName
		return conf, nil
	}
	// Verification is done by VerifyConnection, which (unlike the default)
	// ignores the dialled host name.
	conf.InsecureSkipVerify = true
	conf.VerifyConnection = func(cs tls.ConnectionState) error {
		return verifyByCA(cs, pool)
	}
	return conf, nil
}

func verifyByCA(cs tls.ConnectionState, pool *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("tls: the server presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return fmt.Errorf("tls: server certificate %q not trusted by the cluster CA: %w", leaf.Subject.CommonName, err)
	}
	if leaf.Subject.CommonName == "" {
		return errors.New("tls: server certificate has no CommonName (node name)")
	}
	return nil
}

// PeerNode returns the node name (CommonName) of the verified peer
// certificate of a connection, or "".
func PeerNode(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].Subject.CommonName
}

func (f Files) keyPair() (tls.Certificate, error) {
	if err := CheckSecretFile(f.Key); err != nil {
		return tls.Certificate{}, err
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load TLS certificate %s and key %s: %w", f.Cert, f.Key, err)
	}
	if cert.Leaf != nil && time.Now().After(cert.Leaf.NotAfter) {
		return tls.Certificate{}, fmt.Errorf("TLS certificate %s expired on %s; issue a new one (ukai tls issue)", f.Cert, cert.Leaf.NotAfter.Format(time.RFC3339))
	}
	return cert, nil
}

// LoadCAPool reads the PEM certificates of path into a pool; it fails when
// the file holds none.
func LoadCAPool(path string) (*x509.CertPool, error) {
	if path == "" {
		return nil, errors.New("TLS: a CA certificate is required (tls.ca)")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("CA certificate %s: no PEM certificate in it", path)
	}
	return pool, nil
}

// CheckSecretFile fails when path (a private key or a token) cannot be
// read or is readable by others (mode & 0o004): secrets are refused when
// world-readable.
func CheckSecretFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o004 != 0 {
		return fmt.Errorf("%s is readable by others (mode %04o); refusing to use it: chmod o-r %s", path, fi.Mode().Perm(), path)
	}
	return nil
}

func refuseExisting(paths ...string) error {
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s already exists; refusing to overwrite it (move it away first)", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// writePair writes the certificate (0644) and the key (0600), both with
// O_EXCL; on failure it removes what it wrote.
func writePair(dir, certPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	if err := writeExcl(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := writeExcl(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		os.Remove(keyPath)
		return err
	}
	return nil
}

func writeExcl(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s already exists; refusing to overwrite it (move it away first)", path)
		}
		return err
	}
	// The umask may only remove bits; make the mode exact anyway.
	if err := f.Chmod(mode); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func validNodeName(n string) error {
	if n == "" {
		return errors.New("node name is empty")
	}
	if n == "." || n == ".." || strings.ContainsAny(n, "/\\") || strings.HasPrefix(n, "-") {
		return fmt.Errorf("node name %q cannot be used as a file name", n)
	}
	for _, r := range n {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("node name %q has control characters", n)
		}
	}
	return nil
}

func validDNSName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}
