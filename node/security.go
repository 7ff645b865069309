package node

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/tlsutil"
	"github.com/ukai-storage/ukai/target/iscsi"
)

// security holds what the node authenticates with: the node certificate
// (mutual TLS between nodes, and the API's HTTPS), and the API token every
// node of the cluster shares.
type security struct {
	peerServer *tls.Config // nil: cleartext
	peerClient *tls.Config
	apiServer  *tls.Config
	apiClient  *tls.Config
	token      string
	// discovery is the CHAP of discovery sessions (iscsi.discovery_chap);
	// nil: none.
	discovery *iscsi.Export
}

func loadSecurity(cfg Config) (security, error) {
	var sec security
	if cfg.TLS.Cert != "" {
		f := tlsutil.Files{CA: cfg.TLS.CA, Cert: cfg.TLS.Cert, Key: cfg.TLS.Key}
		var err error
		if sec.peerServer, err = f.ServerConfig(); err != nil {
			return sec, fmt.Errorf("tls: %w", err)
		}
		if sec.peerClient, err = f.ClientConfig(""); err != nil {
			return sec, fmt.Errorf("tls: %w", err)
		}
		sec.apiClient = sec.peerClient
		if cfg.API.TLS {
			// Operators' CLIs present no certificate: the token
			// authenticates them; a certificate from another CA is
			// still refused.
			if sec.apiServer, err = f.ServerConfigClientCertOptional(); err != nil {
				return sec, fmt.Errorf("api.tls: %w", err)
			}
		}
	}
	if cfg.API.TokenFile != "" {
		if err := tlsutil.CheckSecretFile(cfg.API.TokenFile); err != nil {
			return sec, fmt.Errorf("api.token_file: %w", err)
		}
		b, err := os.ReadFile(cfg.API.TokenFile)
		if err != nil {
			return sec, fmt.Errorf("api.token_file: %w", err)
		}
		sec.token = strings.TrimSpace(string(b))
		if sec.token == "" {
			return sec, fmt.Errorf("api.token_file %s is empty", cfg.API.TokenFile)
		}
	}
	if dc := cfg.ISCSI.DiscoveryCHAP; dc.User != "" {
		e := &iscsi.Export{CHAPUser: dc.User, MutualUser: dc.MutualUser}
		var err error
		if e.CHAPSecret, err = readCHAPSecret(dc.SecretFile); err != nil {
			return sec, fmt.Errorf("iscsi.discovery_chap.secret_file: %w", err)
		}
		if dc.MutualSecretFile != "" {
			if e.MutualSecret, err = readCHAPSecret(dc.MutualSecretFile); err != nil {
				return sec, fmt.Errorf("iscsi.discovery_chap.mutual_secret_file: %w", err)
			}
			if e.MutualSecret == e.CHAPSecret {
				return sec, errors.New("iscsi.discovery_chap.mutual_secret_file: the same secret as secret_file (RFC 7143 forbids one secret for both directions)")
			}
		}
		sec.discovery = e
	}
	return sec, nil
}

// readCHAPSecret reads a CHAP secret file (refused when world-readable or
// empty; a final newline is not part of the secret).
func readCHAPSecret(path string) (string, error) {
	if err := tlsutil.CheckSecretFile(path); err != nil {
		return "", err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimRight(string(b), "\r\n")
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}

// apiClient returns a client for another node's control API, with the
// cluster's token and CA.
func (n *Node) apiClient(addr string) *api.Client {
	if n.sec.apiServer == nil {
		return api.NewClientWithAuth(addr, n.sec.token, nil)
	}
	return api.NewClientWithAuth(addr, n.sec.token, n.sec.apiClient)
}

// nodeACL is the node's access list for the iSCSI target, from the
// exports in the catalog (cached in the data dir, so logins work while
// the store is unreachable).
type nodeACL struct{ n *Node }

// Exports implements iscsi.ACL.
func (a nodeACL) Exports(target string) ([]iscsi.Export, bool) {
	n := a.n
	name, ok := strings.CutPrefix(target, n.cfg.ISCSI.IQNPrefix+":")
	if !ok {
		return nil, false
	}
	// A login reads the image's exports afresh, so a withdrawn access
	// counts at once (not after the watch delivers it); the cached ones
	// serve while the metadata store is unreachable.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	fresh, bad, err := n.cat.ImageExports(ctx, name)
	cancel()
	n.exportsMu.Lock()
	if err == nil && len(bad) == 0 {
		// Copy on write: readers hold the old map without the lock.
		m := make(map[string][]meta.Export, len(n.exports)+1)
		for k, v := range n.exports {
			m[k] = v
		}
		m[name] = fresh
		n.exports = m
	}
	exps := n.exports[name]
	n.exportsMu.Unlock()
	if len(exps) == 0 {
		return nil, false
	}
	out := make([]iscsi.Export, 0, len(exps))
	for _, e := range exps {
		secret, err1 := n.secret(e.CHAPSecret, e.CHAPSecretFile)
		mutual, err2 := n.secret(e.MutualSecret, e.MutualSecretFile)
		if err1 != nil || err2 != nil {
			n.log.Warn("export skipped: its CHAP secret cannot be read on this node", "image", name, "initiator", e.Initiator, "err", firstErr(err1, err2))
			continue
		}
		out = append(out, iscsi.Export{Initiator: e.Initiator, CHAPUser: e.CHAPUser, CHAPSecret: secret, MutualUser: e.MutualUser, MutualSecret: mutual})
	}
	return out, true
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func (n *Node) exportsCachePath() string { return filepath.Join(n.cfg.Node.DataDir, "exports.json") }

// cacheExports keeps the last exports read, for a start without the store.
func (n *Node) cacheExports(all map[string][]meta.Export) {
	b, err := json.Marshal(all)
	if err != nil {
		return
	}
	tmp := n.exportsCachePath() + ".tmp"
	if os.WriteFile(tmp, b, 0o600) == nil {
		os.Rename(tmp, n.exportsCachePath())
	}
}

// loadCachedExports fills the access lists from the cache at start.
func (n *Node) loadCachedExports() {
	b, err := os.ReadFile(n.exportsCachePath())
	if err != nil {
		return
	}
	var all map[string][]meta.Export
	if json.Unmarshal(b, &all) == nil {
		n.exportsMu.Lock()
		n.exports = all
		n.exportsMu.Unlock()
	}
}
