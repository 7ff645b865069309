package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// Export implements api.Service: allow an initiator to log in to image,
// with optional CHAP. A secret given in the request is stored in the
// metadata only when iscsi.chap_secret_store is "consul"; otherwise the
// request must name a secret file every node keeps.
func (n *Node) Export(ctx context.Context, name string, req api.ExportRequest) error {
	if err := meta.ValidateName(name); err != nil {
		return err
	}
	if (req.CHAPSecret != "" || req.MutualSecret != "") && n.cfg.ISCSI.CHAPSecretStore != "consul" {
		return fmt.Errorf("%w: this cluster keeps CHAP secrets out of the metadata store (iscsi.chap_secret_store: file): put the secret in a file in iscsi.chap_secrets_dir on every node and pass --chap-secret-ref NAME", meta.ErrInvalid)
	}
	return n.cat.SetExport(ctx, name, meta.Export{
		Initiator: req.Initiator, CHAPUser: req.CHAPUser, CHAPSecret: req.CHAPSecret, CHAPSecretFile: req.CHAPSecretFile,
		MutualUser: req.MutualUser, MutualSecret: req.MutualSecret, MutualSecretFile: req.MutualSecretFile,
	})
}

// Unexport implements api.Service.
func (n *Node) Unexport(ctx context.Context, name, initiator string) error {
	if err := meta.ValidateName(name); err != nil {
		return err
	}
	return n.cat.RemoveExport(ctx, name, initiator)
}

// exportInfos lists an image's exports without secrets.
func (n *Node) exportInfos(name string) []api.ExportInfo {
	n.exportsMu.RLock()
	defer n.exportsMu.RUnlock()
	var out []api.ExportInfo
	for _, e := range n.exports[name] {
		info := api.ExportInfo{Initiator: e.Initiator, CHAPUser: e.CHAPUser, MutualUser: e.MutualUser}
		switch {
		case e.CHAPSecret != "":
			info.SecretIn = "consul"
		case e.CHAPSecretFile != "":
			info.SecretIn = "file:" + e.CHAPSecretFile
		}
		out = append(out, info)
	}
	return out
}

// watchExports keeps the node's copy of the access lists current.
func (n *Node) watchExports(ctx context.Context) {
	var idx uint64
	for ctx.Err() == nil {
		if err := n.loadExports(ctx); err != nil && ctx.Err() == nil {
			n.noteStore(err)
			sleep(ctx, time.Second)
			continue
		}
		next, err := n.kv.Watch(ctx, n.cat.ExportsPrefix(), idx)
		if err != nil {
			if ctx.Err() == nil {
				sleep(ctx, time.Second)
			}
			continue
		}
		idx = next
	}
}

func (n *Node) loadExports(ctx context.Context) error {
	all, bad, err := n.cat.AllExports(ctx)
	if err != nil {
		return err
	}
	for _, b := range bad {
		n.log.Warn("ignoring unreadable export", "err", b)
	}
	n.exportsMu.Lock()
	n.exports = all
	n.exportsLoaded = true
	n.exportsMu.Unlock()
	n.cacheExports(all)
	n.dropWithdrawn(all)
	return nil
}

// dropWithdrawn ends the iSCSI sessions that the exports no longer admit
// (an unexport, or the last export of an image gone under require_acl).
func (n *Node) dropWithdrawn(cur map[string][]meta.Export) {
	for _, si := range n.target.Sessions() {
		image, ok := strings.CutPrefix(si.Target, n.cfg.ISCSI.IQNPrefix+":")
		if !ok || si.Discovery {
			continue
		}
		exps := cur[image]
		if len(exps) == 0 && !n.cfg.ISCSI.RequireACL {
			continue // no exports and no access list required: open
		}
		admitted := false
		for _, e := range exps {
			if e.Initiator == "*" || strings.EqualFold(e.Initiator, si.InitiatorName) {
				admitted = true
			}
		}
		if !admitted {
			n.target.DropInitiator(si.Target, si.InitiatorName)
		}
	}
}

// secret returns a CHAP secret: stored in the export, or read from the
// named file in iscsi.chap_secrets_dir.
func (n *Node) secret(stored, file string) (string, error) {
	if file == "" {
		return stored, nil
	}
	if n.cfg.ISCSI.CHAPSecretsDir == "" {
		return "", errors.New("the export names a secret file but iscsi.chap_secrets_dir is not set on this node")
	}
	p := filepath.Join(n.cfg.ISCSI.CHAPSecretsDir, file)
	st, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("secret file %s: %w", file, err)
	}
	if st.Mode().Perm()&0o004 != 0 {
		return "", fmt.Errorf("secret file %s is world-readable: refused", file)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("secret file %s: %w", file, err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}
