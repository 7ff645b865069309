package meta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Exports: who may log in to an image's target.
//
//	<prefix>exports/<image>/<escaped initiator IQN>   JSON Export
//
// A CHAP secret is stored either in the record (SecretStore "consul": the
// operator allowed it; protect the prefix with a Consul ACL and TLS) or
// only as the name of a file every node keeps in its iscsi.chap_secrets_dir
// (SecretStore "file": Consul never sees the secret).

// Export is one initiator's right to one image.
type Export struct {
	Version   int    `json:"version"`
	Initiator string `json:"initiator"` // IQN, or "*" (any initiator, CHAP required)
	CHAPUser  string `json:"chap_user,omitempty"`
	// CHAPSecret (stored in Consul) or CHAPSecretFile (the name of a file
	// under each node's iscsi.chap_secrets_dir): one of them with a user.
	CHAPSecret       string `json:"chap_secret,omitempty"`
	CHAPSecretFile   string `json:"chap_secret_file,omitempty"`
	MutualUser       string `json:"mutual_user,omitempty"`
	MutualSecret     string `json:"mutual_secret,omitempty"`
	MutualSecretFile string `json:"mutual_secret_file,omitempty"`
}

// Redacted returns the export without secrets (for display).
func (e Export) Redacted() Export {
	if e.CHAPSecret != "" {
		e.CHAPSecret = "(stored)"
	}
	if e.MutualSecret != "" {
		e.MutualSecret = "(stored)"
	}
	return e
}

// Validate checks an export.
func (e Export) Validate() error {
	if e.Initiator == "" || strings.ContainsAny(e.Initiator, " \n\x00") {
		return fmt.Errorf("%w: initiator %q", ErrInvalid, e.Initiator)
	}
	if e.Initiator == "*" && e.CHAPUser == "" {
		return fmt.Errorf("%w: an export to any initiator (*) needs CHAP", ErrInvalid)
	}
	if (e.CHAPUser == "") != (e.CHAPSecret == "" && e.CHAPSecretFile == "") {
		return fmt.Errorf("%w: a CHAP user needs a secret (and a secret a user)", ErrInvalid)
	}
	if (e.MutualUser == "") != (e.MutualSecret == "" && e.MutualSecretFile == "") {
		return fmt.Errorf("%w: a mutual CHAP user needs a secret (and a secret a user)", ErrInvalid)
	}
	if e.MutualUser != "" && e.CHAPUser == "" {
		return fmt.Errorf("%w: mutual CHAP needs one-way CHAP too", ErrInvalid)
	}
	for _, s := range []string{e.CHAPSecret, e.MutualSecret} {
		if s != "" && (len(s) < 12 || len(s) > 255) {
			return fmt.Errorf("%w: CHAP secrets are 12 to 255 bytes (RFC 7143 recommends at least 12)", ErrInvalid)
		}
	}
	for _, f := range []string{e.CHAPSecretFile, e.MutualSecretFile} {
		if f != "" && (strings.ContainsAny(f, `/\`) || strings.HasPrefix(f, ".")) {
			return fmt.Errorf("%w: secret file %q must be a plain file name in iscsi.chap_secrets_dir", ErrInvalid, f)
		}
	}
	return nil
}

func (c *Catalog) exportPrefix(image string) string { return c.prefix + "exports/" + image + "/" }
func (c *Catalog) exportKey(image, initiator string) string {
	return c.exportPrefix(image) + url.PathEscape(initiator)
}

// ErrExportNotFound: the image is not exported to that initiator.
var ErrExportNotFound = errors.New("no such export")

// ExportsPrefix is where all exports live (for watches).
func (c *Catalog) ExportsPrefix() string { return c.prefix + "exports/" }

// SetExport stores (replaces) the export of image to e.Initiator.
func (c *Catalog) SetExport(ctx context.Context, image string, e Export) error {
	e.Version = 1
	e.Initiator = strings.ToLower(e.Initiator) // iSCSI names compare case-insensitively
	if err := e.Validate(); err != nil {
		return err
	}
	if _, _, err := c.GetImage(ctx, image); err != nil {
		return err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return c.put(ctx, c.exportKey(image, e.Initiator), data)
}

// RemoveExport removes the export of image to initiator.
func (c *Catalog) RemoveExport(ctx context.Context, image, initiator string) error {
	key := c.exportKey(image, strings.ToLower(initiator))
	e, err := c.kv.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("%w: %q is not exported to %s", ErrExportNotFound, image, initiator)
	}
	if err != nil {
		return err
	}
	return c.kv.DeleteCAS(ctx, key, e.ModifyIndex)
}

// AllExports returns every export by image, and MalformedErrors.
func (c *Catalog) AllExports(ctx context.Context) (map[string][]Export, []error, error) {
	return c.exportsUnder(ctx, c.ExportsPrefix())
}

// ImageExports returns the exports of one image, and MalformedErrors.
func (c *Catalog) ImageExports(ctx context.Context, image string) ([]Export, []error, error) {
	all, bad, err := c.exportsUnder(ctx, c.exportPrefix(image))
	return all[image], bad, err
}

func (c *Catalog) exportsUnder(ctx context.Context, prefix string) (map[string][]Export, []error, error) {
	entries, _, err := c.kv.List(ctx, prefix)
	if err != nil {
		return nil, nil, fmt.Errorf("list exports: %w", err)
	}
	out := map[string][]Export{}
	var bad []error
	for _, en := range entries {
		rest := strings.TrimPrefix(en.Key, c.ExportsPrefix())
		image, _, ok := strings.Cut(rest, "/")
		var e Export
		err := json.Unmarshal(en.Value, &e)
		if err == nil && e.Version != 1 {
			err = fmt.Errorf("unknown version %d", e.Version)
		}
		if err == nil {
			err = e.Validate()
		}
		if !ok || err != nil {
			bad = append(bad, &MalformedError{Key: en.Key, Err: fmt.Errorf("export: %v", err)})
			continue
		}
		out[image] = append(out[image], e)
	}
	return out, bad, nil
}
