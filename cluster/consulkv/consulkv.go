// Package consulkv implements meta.KV over Consul's HTTP KV API, so that
// several ukai nodes share one catalog. Keys are passed through as given
// (the catalog adds its "ukai/" prefix); Consul's ModifyIndex and
// X-Consul-Index are the KV's indexes.
package consulkv

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// MaxValueSize is the largest value Consul accepts by default
// (kv_max_value_size); larger values are refused before sending.
const MaxValueSize = 512 << 10

// MaxConns bounds the connections one KV opens to its agent.
const MaxConns = 24

// Defaults for Config.
const (
	DefaultAddress   = "127.0.0.1:8500"
	DefaultTimeout   = 5 * time.Second
	DefaultWatchWait = 5 * time.Minute
)

// ErrPermissionDenied is returned when Consul's ACL system refuses a
// request (HTTP 403): the token is missing, unknown or lacks a policy.
var ErrPermissionDenied = errors.New("permission denied by Consul ACL (check consul.token)")

// TLSConfig configures HTTPS to the Consul agent.
type TLSConfig struct {
	CAFile             string // PEM CA bundle to verify the agent; system roots if empty
	CertFile           string // client certificate (mTLS), with KeyFile
	KeyFile            string
	ServerName         string // name to verify in the agent's certificate
	InsecureSkipVerify bool
}

func (t TLSConfig) enabled() bool {
	return t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" || t.ServerName != "" || t.InsecureSkipVerify
}

// Config configures a KV.
type Config struct {
	// Address of the Consul agent's HTTP API: "host:port" or a URL
	// ("http://host:port", "https://host:port"). A bare host:port uses
	// https when TLS is configured. Default 127.0.0.1:8500.
	Address string
	// Token is the ACL token, sent in the X-Consul-Token header. It is
	// never logged nor included in errors.
	Token string
	TLS   TLSConfig
	// Timeout bounds each non-blocking request (default 5s).
	Timeout time.Duration
	// WatchWait is the longest a Watch blocks in one request before
	// returning spuriously (default 5 min; Consul caps it at 10 min).
	WatchWait time.Duration
	Logger    *slog.Logger
	// WrapTransport, when set, wraps the HTTP transport of every request
	// to the agent (metrics count and time them).
	WrapTransport func(http.RoundTripper) http.RoundTripper
}

// KV is a meta.KV backed by Consul. It is safe for concurrent use.
type KV struct {
	client    *api.Client
	kv        *api.KV
	transport *http.Transport
	addr      string // for messages: scheme://host:port, never the token
	token     string // only to scrub it from errors
	timeout   time.Duration
	watchWait time.Duration
	log       *slog.Logger
}

var _ meta.KV = (*KV)(nil)

// New returns a KV for the agent at cfg.Address. It does not contact
// Consul: a node starts even when Consul is down, and calls fail with
// meta.ErrUnavailable until it is back. Use Ping to check reachability.
func New(cfg Config) (*KV, error) {
	if cfg.Address == "" {
		cfg.Address = DefaultAddress
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.WatchWait <= 0 {
		cfg.WatchWait = DefaultWatchWait
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	scheme, hostport := "http", cfg.Address
	if cfg.TLS.enabled() {
		scheme = "https"
	}
	if s, rest, ok := strings.Cut(cfg.Address, "://"); ok {
		switch s {
		case "http", "https":
			scheme, hostport = s, rest
		default:
			return nil, fmt.Errorf("consul address %q: unsupported scheme %q (use http or https)", cfg.Address, s)
		}
	}
	hostport = strings.TrimSuffix(hostport, "/")
	if hostport == "" || strings.Contains(hostport, "/") {
		return nil, fmt.Errorf("consul address %q: want host:port or http(s)://host:port", cfg.Address)
	}

	tlsConf, err := api.SetupTLSConfig(&api.TLSConfig{
		Address:            cfg.TLS.ServerName,
		CAFile:             cfg.TLS.CAFile,
		CertFile:           cfg.TLS.CertFile,
		KeyFile:            cfg.TLS.KeyFile,
		InsecureSkipVerify: cfg.TLS.InsecureSkipVerify,
	})
	if err != nil {
		return nil, fmt.Errorf("consul TLS config: %w", err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConf
	// Every Watch holds a connection for its blocking query; the other
	// requests share the rest. Bounded, so that a burst (hundreds of images
	// created or planned at once) queues for a connection instead of
	// opening one per request: Consul refuses more than 200 concurrent
	// connections from one address by default (HTTP 429, measured at 261
	// images being created on 3 nodes sharing 127.0.0.1 before this bound).
	tr.MaxIdleConnsPerHost = MaxConns
	tr.MaxConnsPerHost = MaxConns
	tr.ResponseHeaderTimeout = 0

	var rt http.RoundTripper = tr
	if cfg.WrapTransport != nil {
		rt = cfg.WrapTransport(tr)
	}
	client, err := api.NewClient(&api.Config{
		Address:    hostport,
		Scheme:     scheme,
		Token:      cfg.Token,
		HttpClient: &http.Client{Transport: rt},
	})
	if err != nil {
		return nil, fmt.Errorf("consul client for %s://%s: %w", scheme, hostport, err)
	}
	return &KV{
		client:    client,
		kv:        client.KV(),
		transport: tr,
		addr:      scheme + "://" + hostport,
		token:     cfg.Token,
		timeout:   cfg.Timeout,
		watchWait: cfg.WatchWait,
		log:       log.With("component", "consulkv", "consul", scheme+"://"+hostport),
	}, nil
}

// Address is the agent's address as used in messages (never the token).
func (k *KV) Address() string { return k.addr }

// Ping reports whether Consul is reachable and has a leader; the error
// wraps meta.ErrUnavailable when it is not.
func (k *KV) Ping(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	leader, err := k.client.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(rctx))
	if err != nil {
		return k.fail(ctx, "ping", "", err)
	}
	if leader == "" {
		return fmt.Errorf("consul at %s has no cluster leader: %w", k.addr, meta.ErrUnavailable)
	}
	return nil
}

// Get implements meta.KV.
func (k *KV) Get(ctx context.Context, key string) (meta.Entry, error) {
	if err := checkKey(key); err != nil {
		return meta.Entry{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	p, _, err := k.kv.Get(key, k.query(rctx))
	if err != nil {
		return meta.Entry{}, k.fail(ctx, "get", key, err)
	}
	if p == nil {
		return meta.Entry{}, fmt.Errorf("%s: %w", key, meta.ErrNotFound)
	}
	return entry(p), nil
}

// List implements meta.KV. The index is Consul's X-Consul-Index for the
// prefix.
func (k *KV) List(ctx context.Context, prefix string) ([]meta.Entry, uint64, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, 0, err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	ps, qm, err := k.kv.List(prefix, k.query(rctx))
	if err != nil {
		return nil, 0, k.fail(ctx, "list", prefix, err)
	}
	return entries(ps), qm.LastIndex, nil
}

// CAS implements meta.KV: index 0 creates only (Consul's cas=0), otherwise
// the key's ModifyIndex must still be index.
func (k *KV) CAS(ctx context.Context, key string, value []byte, index uint64) error {
	if err := checkWrite(key, value); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	ok, _, err := k.kv.CAS(&api.KVPair{Key: key, Value: value, ModifyIndex: index}, k.write(rctx))
	if err != nil {
		return k.fail(ctx, "cas", key, err)
	}
	if !ok {
		if index == 0 {
			return fmt.Errorf("%s: already exists: %w", key, meta.ErrConflict)
		}
		return fmt.Errorf("%s: modify index is no longer %d: %w", key, index, meta.ErrConflict)
	}
	return nil
}

// CASGuarded implements meta.KV as one Consul transaction: check the
// guard's index, then check-and-set the key. A rolled-back transaction
// (HTTP 409) is a conflict on one of the two.
func (k *KV) CASGuarded(ctx context.Context, key string, value []byte, index uint64, guard string, guardIndex uint64) error {
	if err := checkWrite(key, value); err != nil {
		return err
	}
	if err := checkKey(guard); err != nil {
		return err
	}
	rolledBack, err := k.txn(ctx, "cas", key, api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVCheckIndex, Key: guard, Index: guardIndex}},
		{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: key, Value: value, Index: index}},
	})
	if rolledBack {
		return fmt.Errorf("%s (guarded by %s at %d): modify index moved: %w", key, guard, guardIndex, meta.ErrConflict)
	}
	return err
}

// checkWrite checks a key and a value before they are sent.
func checkWrite(key string, value []byte) error {
	if err := checkKey(key); err != nil {
		return err
	}
	if len(value) > MaxValueSize {
		return fmt.Errorf("consul kv %s: value of %d bytes exceeds Consul's limit of %d bytes (512 KiB)", key, len(value), MaxValueSize)
	}
	return nil
}

// txn runs ops as one Consul transaction. rolledBack: Consul answered 409,
// one of the checks failed and nothing changed.
func (k *KV) txn(ctx context.Context, what, key string, ops api.TxnOps) (rolledBack bool, err error) {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	// Raw, not Txn(): the latter drops the HTTP status of failures.
	_, err = k.client.Raw().Write("/v1/txn", ops, nil, k.write(rctx))
	var se api.StatusError
	switch {
	case err == nil:
		return false, nil
	case errors.As(err, &se) && se.Code == http.StatusConflict:
		return true, nil
	default:
		return false, k.fail(ctx, what, key, err)
	}
}

// DeleteCAS implements meta.KV. It runs as a Consul transaction (check the
// index, then delete) so a missing key is not silently "deleted"; when the
// transaction is rolled back (HTTP 409) a Get tells ErrNotFound from ErrConflict.
func (k *KV) DeleteCAS(ctx context.Context, key string, index uint64) error {
	if err := checkKey(key); err != nil {
		return err
	}
	rolledBack, err := k.txn(ctx, "delete", key, api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVCheckIndex, Key: key, Index: index}},
		{KV: &api.KVTxnOp{Verb: api.KVDelete, Key: key}},
	})
	if !rolledBack {
		return err
	}
	if _, err := k.Get(ctx, key); err != nil {
		return err // ErrNotFound, or why the check failed
	}
	return fmt.Errorf("%s: modify index is no longer %d: %w", key, index, meta.ErrConflict)
}

// CASTouch implements meta.KV as one Consul transaction: the check-and-set
// (or check-index and delete) and a set of every touched key. A rolled
// back transaction is a conflict, or a missing key for a delete (told
// apart by a read, as DeleteCAS does).
func (k *KV) CASTouch(ctx context.Context, key string, value []byte, index uint64, touch []string) error {
	if err := checkWrite(key, value); err != nil {
		return err
	}
	var ops api.TxnOps
	if value == nil {
		ops = api.TxnOps{
			{KV: &api.KVTxnOp{Verb: api.KVCheckIndex, Key: key, Index: index}},
			{KV: &api.KVTxnOp{Verb: api.KVDelete, Key: key}},
		}
	} else {
		ops = api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: key, Value: value, Index: index}}}
	}
	for _, t := range touch {
		if err := checkKey(t); err != nil {
			return err
		}
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: t, Value: meta.TouchValue()}})
	}
	rolledBack, err := k.txn(ctx, "cas", key, ops)
	if !rolledBack {
		return err
	}
	if value == nil {
		if _, err := k.Get(ctx, key); err != nil {
			return err
		}
	}
	if index == 0 {
		return fmt.Errorf("%s: already exists: %w", key, meta.ErrConflict)
	}
	return fmt.Errorf("%s: modify index is no longer %d: %w", key, index, meta.ErrConflict)
}

// DeleteTree implements meta.KV. An empty prefix is refused: the Consul
// KV store is usually shared with other users.
func (k *KV) DeleteTree(ctx context.Context, prefix string) error {
	if prefix == "" {
		return errors.New("consul kv: refusing to delete the whole store (empty prefix)")
	}
	if err := checkPrefix(prefix); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	if _, err := k.kv.DeleteTree(prefix, k.write(rctx)); err != nil {
		return k.fail(ctx, "delete tree", prefix, err)
	}
	return nil
}

// Watch implements meta.KV with a Consul blocking query on prefix. It
// returns once the prefix's index passes index, after WatchWait with the
// same index (a spurious wake-up), or at once with a smaller index when
// Consul's index went backwards (a restarted or restored cluster, or
// reaped tombstones): the caller re-reads and watches from the new index,
// which is Consul's documented rule for blocking queries.
func (k *KV) Watch(ctx context.Context, prefix string, index uint64) (uint64, error) {
	if err := checkPrefix(prefix); err != nil {
		return 0, err
	}
	if index > 0 {
		// A blocking query waits while the store's index is <= index, so
		// after a reset it would sit out WatchWait. Check first, cheaply
		// (keys only), and confirm with the same query List uses.
		cur, err := k.index(ctx, prefix, true)
		if err != nil {
			return 0, err
		}
		if cur < index {
			if cur, err = k.index(ctx, prefix, false); err != nil {
				return 0, err
			}
			if cur < index {
				k.log.Warn("consul index went backwards; resetting watch", "prefix", prefix, "from", index, "to", cur)
				return cur, nil
			}
		}
	}
	// Consul adds up to wait/16 of jitter; allow that and a request's
	// worth of slack before declaring the agent unresponsive.
	rctx, cancel := context.WithTimeout(ctx, k.watchWait+k.watchWait/16+k.timeout)
	defer cancel()
	q := k.query(rctx)
	q.WaitIndex = index
	q.WaitTime = k.watchWait
	// The same query as List, so the index compares with List's.
	_, qm, err := k.kv.List(prefix, q)
	if err != nil {
		return 0, k.fail(ctx, "watch", prefix, err)
	}
	if qm.LastIndex < index {
		k.log.Warn("consul index went backwards; resetting watch", "prefix", prefix, "from", index, "to", qm.LastIndex)
	}
	return qm.LastIndex, nil
}

// index is the prefix's current X-Consul-Index (keys: list keys only).
func (k *KV) index(ctx context.Context, prefix string, keys bool) (uint64, error) {
	rctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	var qm *api.QueryMeta
	var err error
	if keys {
		_, qm, err = k.kv.Keys(prefix, "", k.query(rctx))
	} else {
		_, qm, err = k.kv.List(prefix, k.query(rctx))
	}
	if err != nil {
		return 0, k.fail(ctx, "watch", prefix, err)
	}
	return qm.LastIndex, nil
}

// Close implements meta.KV: it drops idle connections. Calls in flight
// end with their contexts.
func (k *KV) Close() error {
	k.transport.CloseIdleConnections()
	return nil
}

func (k *KV) query(ctx context.Context) *api.QueryOptions {
	return (&api.QueryOptions{}).WithContext(ctx)
}

func (k *KV) write(ctx context.Context) *api.WriteOptions {
	return (&api.WriteOptions{}).WithContext(ctx)
}

// fail turns an error of the Consul client into ours: ctx.Err() when the
// caller's context ended, ErrPermissionDenied on an ACL refusal,
// meta.ErrUnavailable when Consul cannot serve (network, timeout, 5xx, no
// leader, rate limit). The token never appears in the message.
func (k *KV) fail(ctx context.Context, op, key string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	what := "consul " + op
	if key != "" {
		what += " " + key
	}
	err = k.scrub(err)
	var se api.StatusError
	if errors.As(err, &se) {
		switch {
		case se.Code == http.StatusForbidden:
			return fmt.Errorf("%s at %s: %w: %s", what, k.addr, ErrPermissionDenied, se.Body)
		case se.Code == http.StatusRequestEntityTooLarge:
			return fmt.Errorf("%s at %s: value too large for Consul (kv_max_value_size): %s", what, k.addr, se.Body)
		case se.Code >= 500 || se.Code == http.StatusTooManyRequests:
			return fmt.Errorf("%s: consul at %s is unavailable (HTTP %d: %s): %w", what, k.addr, se.Code, se.Body, meta.ErrUnavailable)
		default:
			return fmt.Errorf("%s at %s: %w", what, k.addr, err)
		}
	}
	return fmt.Errorf("%s: consul at %s is unreachable: %w (%w)", what, k.addr, meta.ErrUnavailable, err)
}

// scrub keeps the token out of error text, whatever the client put there.
func (k *KV) scrub(err error) error {
	if k.token == "" || !strings.Contains(err.Error(), k.token) {
		return err
	}
	return redacted{err: err, token: k.token}
}

type redacted struct {
	err   error
	token string
}

func (r redacted) Error() string { return strings.ReplaceAll(r.err.Error(), r.token, "[token]") }
func (r redacted) Unwrap() error { return r.err }

func checkKey(key string) error {
	if key == "" {
		return errors.New("consul kv: empty key")
	}
	return checkPrefix(key)
}

func checkPrefix(p string) error {
	if strings.HasPrefix(p, "/") {
		return fmt.Errorf("consul kv: key %q must not start with '/'", p)
	}
	return nil
}

func entry(p *api.KVPair) meta.Entry {
	return meta.Entry{Key: p.Key, Value: p.Value, ModifyIndex: p.ModifyIndex, Session: p.Session}
}

func entries(ps api.KVPairs) []meta.Entry {
	out := make([]meta.Entry, 0, len(ps))
	for _, p := range ps {
		out = append(out, entry(p))
	}
	slices.SortFunc(out, func(a, b meta.Entry) int { return strings.Compare(a.Key, b.Key) })
	return out
}
