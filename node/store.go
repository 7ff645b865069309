package node

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// openStore opens the configured metadata store. A Consul that cannot be
// reached does not stop the node: it is reported and retried.
// wrap, when set, wraps the Consul client's transport (metrics).
func openStore(ctx context.Context, cfg Config, log *slog.Logger, wrap func(http.RoundTripper) http.RoundTripper) (meta.KV, error) {
	switch cfg.Metadata.Backend {
	case "embedded":
		kv, err := meta.OpenBolt(filepath.Join(cfg.Node.DataDir, "meta.db"))
		if err != nil {
			return nil, fmt.Errorf("metadata.backend embedded: %w", err)
		}
		return kv, nil
	case "consul":
		token := cfg.Consul.Token
		if cfg.Consul.TokenFile != "" {
			b, err := os.ReadFile(cfg.Consul.TokenFile)
			if err != nil {
				return nil, fmt.Errorf("consul.token_file: %w", err)
			}
			token = strings.TrimSpace(string(b))
		}
		kv, err := consulkv.New(consulkv.Config{
			Address: cfg.Consul.Address,
			Token:   token,
			TLS: consulkv.TLSConfig{
				CAFile: cfg.Consul.TLS.CAFile, CertFile: cfg.Consul.TLS.CertFile, KeyFile: cfg.Consul.TLS.KeyFile,
				ServerName: cfg.Consul.TLS.ServerName, InsecureSkipVerify: cfg.Consul.TLS.InsecureSkipVerify,
			},
			Logger:        log.With("component", "consul"),
			WrapTransport: wrap,
		})
		if err != nil {
			return nil, fmt.Errorf("consul: %w", err)
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := kv.Ping(pctx); err != nil {
			log.Error("Consul is unreachable at start: serving cached images, retrying in the background", "address", cfg.Consul.Address, "err", err)
		}
		return kv, nil
	}
	return nil, fmt.Errorf("metadata.backend %q: unknown", cfg.Metadata.Backend)
}

// check that consulkv satisfies the seam.
var _ meta.KV = (*consulkv.KV)(nil)
