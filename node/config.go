// Package node is the ukai daemon: it wires the metadata store, the LUN
// backends, the iSCSI target and the control API of one storage node.
package node

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/placement"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// Config is a node's configuration. Every field has a key in the config
// file (shown in `mapstructure` tags), an environment variable UKAI_<KEY>
// with dots as underscores (UKAI_NODE_DATA_DIR), and a flag of `ukai serve`.
type Config struct {
	Node      NodeConfig      `mapstructure:"node"`
	API       APIConfig       `mapstructure:"api"`
	ISCSI     ISCSIConfig     `mapstructure:"iscsi"`
	Metadata  MetadataConfig  `mapstructure:"metadata"`
	Peer      PeerConfig      `mapstructure:"peer"`
	Consul    ConsulConfig    `mapstructure:"consul"`
	Placement PlacementConfig `mapstructure:"placement"`
	Owner     OwnerConfig     `mapstructure:"owner"`
	Trash     TrashConfig     `mapstructure:"trash"`
	TLS       TLSConfig       `mapstructure:"tls"`
	Gossip    GossipConfig    `mapstructure:"gossip"`
	Log       LogConfig       `mapstructure:"log"`
	// Insecure lets a node listen beyond loopback without the protection
	// each listener needs (api.token_file, tls.*, gossip.secret_key);
	// without it such a node refuses to start. Every start with it logs a
	// warning per unsafe setting (UnsafeSettings).
	Insecure bool `mapstructure:"insecure"`
}

// NodeConfig names the node and its storage.
type NodeConfig struct {
	// Name is unique in the cluster: lowercase letters, digits, '-'.
	Name string `mapstructure:"name"`
	// DataDir holds the node's image copies and embedded metadata. It must
	// exist.
	DataDir string `mapstructure:"data_dir"`
	// Labels describe the node to placement policies (zone, rack, ...).
	Labels map[string]string `mapstructure:"labels"`
}

// APIConfig is the control API (HTTP/JSON).
type APIConfig struct {
	Listen string `mapstructure:"listen"` // IP:port, bound exactly
	// Pprof serves Go's profiler under /debug/pprof/ on the API address
	// (for performance work; off by default).
	Pprof bool `mapstructure:"pprof"`
	// TokenFile holds the bearer token every API request must carry
	// (empty: no token; not world-readable).
	TokenFile string `mapstructure:"token_file"`
	// TLS serves the API over HTTPS with the node certificate (tls.*).
	TLS bool `mapstructure:"tls"`
	// MetricsPublic serves /metrics without the token (for a Prometheus
	// that cannot send one); everything else still needs it.
	MetricsPublic bool `mapstructure:"metrics_public"`
	// MetricsIO counts each image's I/O for /metrics and `ukai image
	// iostat` (on by default; its cost is a bench row).
	MetricsIO bool `mapstructure:"metrics_io"`
}

// ISCSIConfig is the iSCSI target.
type ISCSIConfig struct {
	Listen string `mapstructure:"listen"` // IP:port of the portal, bound exactly
	// Advertise is the address initiators use to reach the portal
	// ("host:port": an IP or a DNS name), answered by discovery on every
	// node for the images this node serves; default Listen.
	Advertise string `mapstructure:"advertise"`
	// IQNPrefix: image NAME is exported as target <IQNPrefix>:NAME.
	IQNPrefix string `mapstructure:"iqn_prefix"`
	// RequireACL: an image with no export admits nobody and is hidden
	// from discovery (the default); false: it admits everyone.
	RequireACL bool `mapstructure:"require_acl"`
	// CHAPSecretStore says where CHAP secrets may live: "file" (default:
	// only the name of a file in CHAPSecretsDir is stored in the
	// metadata, every node keeps the file) or "consul" (the secret is
	// stored in the metadata store: protect it with Consul ACLs and TLS).
	CHAPSecretStore string `mapstructure:"chap_secret_store"`
	CHAPSecretsDir  string `mapstructure:"chap_secrets_dir"`
	// DiscoveryCHAP, when its user is set, requires CHAP on discovery
	// (SendTargets) sessions.
	DiscoveryCHAP DiscoveryCHAPConfig `mapstructure:"discovery_chap"`

	// Resource bounds of the portal (docs/security.md): connections in
	// all and per source IP address; how long a login and a write's
	// Data-Out may take; write buffers held per session and per node,
	// in MiB; responses queued per connection, in MiB.
	MaxConnections           int           `mapstructure:"max_connections"`
	MaxConnectionsPerAddress int           `mapstructure:"max_connections_per_address"`
	LoginTimeout             time.Duration `mapstructure:"login_timeout"`
	DataOutTimeout           time.Duration `mapstructure:"data_out_timeout"`
	SessionWriteBufferMiB    int           `mapstructure:"session_write_buffer_mib"`
	WriteBufferMiB           int           `mapstructure:"write_buffer_mib"`
	ResponseQueueMiB         int           `mapstructure:"response_queue_mib"`
}

// DiscoveryCHAPConfig is CHAP for discovery sessions: the initiator proves
// itself with User and the secret in SecretFile; with MutualUser and
// MutualSecretFile the node proves itself to an initiator that asks.
// Secret files must not be world-readable.
type DiscoveryCHAPConfig struct {
	User             string `mapstructure:"user"`
	SecretFile       string `mapstructure:"secret_file"`
	MutualUser       string `mapstructure:"mutual_user"`
	MutualSecretFile string `mapstructure:"mutual_secret_file"`
}

// TLSConfig is mutual TLS between nodes (data transport) and, with
// api.tls, for the control API.
type TLSConfig struct {
	CA   string `mapstructure:"ca"`
	Cert string `mapstructure:"cert"`
	Key  string `mapstructure:"key"`
}

// PeerConfig is the data transport between nodes (block reads, writes,
// checksums and bulk copies of image copies).
type PeerConfig struct {
	Listen string `mapstructure:"listen"` // IP:port, bound exactly
	// Advertise is the address the other nodes use to reach it (default
	// Listen): a proxy or NAT in front of the node.
	Advertise string `mapstructure:"advertise"`
	// Timeout bounds each copy's part of a request; a copy that does not
	// answer in time is recorded out of sync and the write goes on.
	Timeout time.Duration `mapstructure:"timeout"`
}

// OwnerConfig tunes image ownership.
type OwnerConfig struct {
	// LeaseTTL is the TTL of the node's ownership session in the
	// metadata store (docs/ownership.md). The node renews it every TTL/3
	// and stops doing I/O on every image it owns when it could not renew
	// for a TTL; the store frees a dead node's locks after 1-2 TTLs
	// (sooner when the membership saw it die) and hands them to nobody
	// for a lock delay of 1.1 TTL. Consul refuses TTLs under its server's
	// session_ttl_min (10 s unless lowered).
	LeaseTTL time.Duration `mapstructure:"lease_ttl"`
	// ClockOffset shifts this node's clock (tests: a node minutes ahead
	// must change nothing, since no decision compares two nodes' clocks).
	ClockOffset time.Duration `mapstructure:"clock_offset"`
}

// PlacementConfig tunes the placement executor.
type PlacementConfig struct {
	// ReplaceAfter: a copy on a node dead longer than this is replaced by a
	// new copy elsewhere, within sync windows and caps (0: never; the
	// operator decides).
	ReplaceAfter time.Duration `mapstructure:"replace_after"`
	// Locality is the data-locality policy of images whose own policy
	// does not say: off, best-effort or strict. Like replace_after it is
	// read by the node that plans an image (its owner): give every node
	// the same value.
	Locality string `mapstructure:"locality"`
	// LocalityDelay: how long an image must be owned by a node without a
	// copy before locality adds one there (a VM that only passes through
	// does not pull its disk along).
	LocalityDelay time.Duration `mapstructure:"locality_delay"`
}

// TrashConfig: what `image delete` does with an image (see package trash).
type TrashConfig struct {
	// Defer: how long a deleted image waits in the trash before it is
	// purged (its data removed for good); `image delete --now` skips the
	// trash. Read by the node a delete is asked of: give every node the
	// same value.
	Defer time.Duration `mapstructure:"defer"`
	// Sweep: how often the node purges the expired images it holds a copy
	// of and removes the data files of purged ones.
	Sweep time.Duration `mapstructure:"sweep"`
}

// MetadataConfig selects the metadata store.
type MetadataConfig struct {
	Backend string `mapstructure:"backend"` // "embedded" or "consul"
}

// ConsulConfig is the Consul KV store (metadata.backend: consul).
type ConsulConfig struct {
	Address   string          `mapstructure:"address"`    // agent HTTP address, IP:port or URL
	Token     string          `mapstructure:"token"`      // ACL token
	TokenFile string          `mapstructure:"token_file"` // ACL token read from a file (not world-readable)
	Prefix    string          `mapstructure:"prefix"`     // key prefix, default "ukai/"
	TLS       ConsulTLSConfig `mapstructure:"tls"`
}

// ConsulTLSConfig is HTTPS to the Consul agent.
type ConsulTLSConfig struct {
	CAFile             string `mapstructure:"ca_file"`
	CertFile           string `mapstructure:"cert_file"`
	KeyFile            string `mapstructure:"key_file"`
	ServerName         string `mapstructure:"server_name"`
	InsecureSkipVerify bool   `mapstructure:"insecure_skip_verify"`
}

// GossipConfig is cluster membership (hashicorp/memberlist). An empty
// Bind runs the node alone, without gossip.
type GossipConfig struct {
	Bind      string   `mapstructure:"bind"`       // IP:port for gossip (UDP and TCP)
	Advertise string   `mapstructure:"advertise"`  // IP:port others use, default Bind
	Join      []string `mapstructure:"join"`       // seeds IP:port
	SecretKey string   `mapstructure:"secret_key"` // base64 of 16, 24 or 32 bytes: encrypts gossip
	// Failure detection knobs; 0 keeps memberlist's LAN defaults (a dead
	// node is reported within 10 s).
	ProbeInterval  time.Duration `mapstructure:"probe_interval"`
	ProbeTimeout   time.Duration `mapstructure:"probe_timeout"`
	GossipInterval time.Duration `mapstructure:"gossip_interval"`
	SuspicionMult  int           `mapstructure:"suspicion_mult"`
}

// LogConfig sets logging.
type LogConfig struct {
	Level string `mapstructure:"level"` // debug, info, warn, error
}

// defaults lists every known key with its default; a key missing here is
// unknown and refused.
var defaults = map[string]any{
	"node.name":                       "",
	"node.data_dir":                   "",
	"node.labels":                     map[string]string{},
	"api.listen":                      "127.0.0.1:7700",
	"api.pprof":                       false,
	"api.metrics_public":              false,
	"api.metrics_io":                  true,
	"iscsi.listen":                    "127.0.0.1:3260",
	"iscsi.advertise":                 "",
	"iscsi.iqn_prefix":                "iqn.2026-11.io.ukai",
	"iscsi.require_acl":               true,
	"iscsi.chap_secret_store":         "file",
	"iscsi.chap_secrets_dir":          "",
	"tls.ca":                          "",
	"tls.cert":                        "",
	"tls.key":                         "",
	"api.token_file":                  "",
	"api.tls":                         false,
	"metadata.backend":                "embedded",
	"peer.listen":                     "",
	"owner.lease_ttl":                 10 * time.Second,
	"owner.clock_offset":              time.Duration(0),
	"placement.replace_after":         time.Duration(0),
	"placement.locality":              "off",
	"placement.locality_delay":        10 * time.Minute,
	"trash.defer":                     24 * time.Hour,
	"trash.sweep":                     time.Minute,
	"peer.advertise":                  "",
	"peer.timeout":                    10 * time.Second,
	"consul.address":                  "127.0.0.1:8500",
	"consul.token":                    "",
	"consul.token_file":               "",
	"consul.prefix":                   "ukai/",
	"consul.tls.ca_file":              "",
	"consul.tls.cert_file":            "",
	"consul.tls.key_file":             "",
	"consul.tls.server_name":          "",
	"consul.tls.insecure_skip_verify": false,
	"gossip.bind":                     "",
	"gossip.advertise":                "",
	"gossip.join":                     []string{},
	"gossip.secret_key":               "",
	"gossip.probe_interval":           time.Duration(0),
	"gossip.probe_timeout":            time.Duration(0),
	"gossip.gossip_interval":          time.Duration(0),
	"gossip.suspicion_mult":           0,
	"log.level":                       "info",
	"insecure":                        false,
	// Resource bounds of the iSCSI portal (docs/security.md).
	"iscsi.max_connections":             4096,
	"iscsi.max_connections_per_address": 512,
	"iscsi.login_timeout":               15 * time.Second,
	"iscsi.data_out_timeout":            30 * time.Second,
	"iscsi.session_write_buffer_mib":    64,
	"iscsi.write_buffer_mib":            1024,
	"iscsi.response_queue_mib":          16,
	// CHAP for discovery sessions (all four empty: none).
	"iscsi.discovery_chap.user":               "",
	"iscsi.discovery_chap.secret_file":        "",
	"iscsi.discovery_chap.mutual_user":        "",
	"iscsi.discovery_chap.mutual_secret_file": "",
}

// Flags registers the serve flags, one per key, on fs.
func Flags(fs *pflag.FlagSet) {
	fs.String("config", "", "configuration file (YAML)")
	fs.String("node.name", "", "node name, unique in the cluster")
	fs.String("node.data_dir", "", "directory for image copies and embedded metadata (must exist)")
	fs.String("api.listen", "", "control API address IP:port (default 127.0.0.1:7700)")
	fs.String("iscsi.listen", "", "iSCSI portal address IP:port (default 127.0.0.1:3260)")
	fs.String("iscsi.advertise", "", "iSCSI address initiators use, host:port (default iscsi.listen)")
	fs.String("iscsi.iqn_prefix", "", "IQN prefix; image NAME is target PREFIX:NAME")
	fs.String("metadata.backend", "", "metadata store: embedded or consul")
	fs.String("consul.address", "", "Consul agent HTTP address (default 127.0.0.1:8500)")
	fs.String("consul.token_file", "", "file holding the Consul ACL token")
	fs.String("consul.prefix", "", "Consul KV prefix (default ukai/)")
	fs.String("peer.listen", "", "peer data address IP:port (needed for images with copies on several nodes)")
	fs.String("gossip.bind", "", "gossip address IP:port (empty: no cluster)")
	fs.String("gossip.advertise", "", "gossip address others use (default gossip.bind)")
	fs.StringSlice("gossip.join", nil, "gossip seeds IP:port, comma separated")
	fs.String("log.level", "", "log level: debug, info, warn, error")
}

// LoadConfig reads the configuration: defaults, then the file (when
// path is not empty), then UKAI_* environment variables, then the flags
// that were set on fs (fs may be nil). Later sources win. Unknown keys in
// the file and invalid values are refused with an error naming the key.
func LoadConfig(path string, fs *pflag.FlagSet) (Config, error) {
	v := viper.New()
	for k, d := range defaults {
		v.SetDefault(k, d)
	}
	if path != "" {
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("config file %s: %w", path, err)
		}
		var unknown []string
		for _, k := range v.AllKeys() {
			if _, ok := defaults[k]; !ok && !strings.HasPrefix(k, "node.labels.") {
				unknown = append(unknown, k)
			}
		}
		if len(unknown) > 0 {
			sort.Strings(unknown)
			return Config{}, fmt.Errorf("config file %s: unknown key(s) %s", path, strings.Join(unknown, ", "))
		}
	}
	v.SetEnvPrefix("UKAI")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if fs != nil {
		var bindErr error
		fs.VisitAll(func(f *pflag.Flag) {
			if _, ok := defaults[f.Name]; ok && f.Changed {
				bindErr = errors.Join(bindErr, v.BindPFlag(f.Name, f))
			}
		})
		if bindErr != nil {
			return Config{}, bindErr
		}
	}
	var c Config
	if err := v.UnmarshalExact(&c); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

var (
	nodeNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	iqnRE      = regexp.MustCompile(`^iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[a-z0-9.:-]*[a-z0-9])?$`)
	labelRE    = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,62})$`)
)

// Validate checks every value; errors name the key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.Node.Name == "" {
		bad("node.name", "required")
	} else if !nodeNameRE.MatchString(c.Node.Name) {
		bad("node.name", "%q: use lowercase letters, digits and '-'", c.Node.Name)
	}
	if c.Node.DataDir == "" {
		bad("node.data_dir", "required")
	} else if st, err := os.Stat(c.Node.DataDir); err != nil {
		bad("node.data_dir", "%v", err)
	} else if !st.IsDir() {
		bad("node.data_dir", "%s is not a directory", c.Node.DataDir)
	}
	for k, v := range c.Node.Labels {
		if !labelRE.MatchString(k) || strings.ContainsAny(v, "\n\x00") || len(v) > 128 {
			bad("node.labels", "invalid label %q=%q", k, v)
		}
	}
	if err := checkAddr(c.API.Listen); err != nil {
		bad("api.listen", "%v", err)
	}
	if err := checkAddr(c.ISCSI.Listen); err != nil {
		bad("iscsi.listen", "%v", err)
	}
	if c.ISCSI.Advertise != "" {
		if err := checkAdvertise(c.ISCSI.Advertise); err != nil {
			bad("iscsi.advertise", "%v", err)
		}
	}
	if c.API.Listen == c.ISCSI.Listen && c.API.Listen != "" {
		bad("iscsi.listen", "same address as api.listen (%s)", c.API.Listen)
	}
	if !iqnRE.MatchString(c.ISCSI.IQNPrefix) {
		bad("iscsi.iqn_prefix", "%q is not an IQN like iqn.2026-11.com.example or iqn.2026-11.com.example:storage", c.ISCSI.IQNPrefix)
	}
	checkISCSILimits(&c.ISCSI, bad)
	switch c.Metadata.Backend {
	case "embedded":
	case "consul":
		if err := checkConsulAddr(c.Consul.Address); err != nil {
			bad("consul.address", "%v", err)
		}
		if c.Consul.Prefix == "" || strings.HasPrefix(c.Consul.Prefix, "/") || !strings.HasSuffix(c.Consul.Prefix, "/") {
			bad("consul.prefix", "%q: must be non-empty, not start with '/' and end with '/'", c.Consul.Prefix)
		}
		if c.Consul.Token != "" && c.Consul.TokenFile != "" {
			bad("consul.token_file", "set either consul.token or consul.token_file, not both")
		}
		for key, f := range map[string]string{"consul.token_file": c.Consul.TokenFile, "consul.tls.ca_file": c.Consul.TLS.CAFile, "consul.tls.cert_file": c.Consul.TLS.CertFile, "consul.tls.key_file": c.Consul.TLS.KeyFile} {
			if f == "" {
				continue
			}
			if st, err := os.Stat(f); err != nil {
				bad(key, "%v", err)
			} else if (key == "consul.token_file" || key == "consul.tls.key_file") && st.Mode().Perm()&0o004 != 0 {
				bad(key, "%s is world-readable: it holds a secret (chmod o-r)", f)
			}
		}
		if (c.Consul.TLS.CertFile == "") != (c.Consul.TLS.KeyFile == "") {
			bad("consul.tls.key_file", "consul.tls.cert_file and consul.tls.key_file go together")
		}
	default:
		bad("metadata.backend", "%q: must be \"embedded\" or \"consul\"", c.Metadata.Backend)
	}
	if c.Peer.Listen != "" {
		if err := checkAddr(c.Peer.Listen); err != nil {
			bad("peer.listen", "%v", err)
		}
		if c.Peer.Advertise != "" {
			if err := checkAddr(c.Peer.Advertise); err != nil {
				bad("peer.advertise", "%v", err)
			}
		}
		if c.Peer.Listen == c.API.Listen || c.Peer.Listen == c.ISCSI.Listen {
			bad("peer.listen", "same address as the API or the iSCSI portal")
		}
	}
	if c.Owner.LeaseTTL < 3*time.Second || c.Owner.LeaseTTL > 50*time.Second {
		// Its lock delay (1.1 TTL) must stay within Consul's 60 s.
		bad("owner.lease_ttl", "%v: must be between 3s and 50s", c.Owner.LeaseTTL)
	}
	switch c.ISCSI.CHAPSecretStore {
	case "file", "consul":
	default:
		bad("iscsi.chap_secret_store", "%q: must be \"file\" or \"consul\"", c.ISCSI.CHAPSecretStore)
	}
	if d := c.ISCSI.CHAPSecretsDir; d != "" {
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			bad("iscsi.chap_secrets_dir", "%s is not a directory", d)
		}
	}
	if dc := c.ISCSI.DiscoveryCHAP; dc != (DiscoveryCHAPConfig{}) {
		if dc.User == "" || dc.SecretFile == "" {
			bad("iscsi.discovery_chap", "user and secret_file go together")
		}
		if (dc.MutualUser == "") != (dc.MutualSecretFile == "") {
			bad("iscsi.discovery_chap", "mutual_user and mutual_secret_file go together")
		}
		for key, f := range map[string]string{"iscsi.discovery_chap.secret_file": dc.SecretFile, "iscsi.discovery_chap.mutual_secret_file": dc.MutualSecretFile} {
			if f == "" {
				continue
			}
			if st, err := os.Stat(f); err != nil {
				bad(key, "%v", err)
			} else if st.Mode().Perm()&0o004 != 0 {
				bad(key, "%s is world-readable: it holds a secret (chmod o-r)", f)
			}
		}
	}
	if (c.TLS.CA == "") != (c.TLS.Cert == "") || (c.TLS.Cert == "") != (c.TLS.Key == "") {
		bad("tls", "tls.ca, tls.cert and tls.key go together")
	}
	for key, f := range map[string]string{"tls.ca": c.TLS.CA, "tls.cert": c.TLS.Cert, "tls.key": c.TLS.Key, "api.token_file": c.API.TokenFile} {
		if f == "" {
			continue
		}
		if st, err := os.Stat(f); err != nil {
			bad(key, "%v", err)
		} else if (key == "tls.key" || key == "api.token_file") && st.Mode().Perm()&0o004 != 0 {
			bad(key, "%s is world-readable: it holds a secret (chmod o-r)", f)
		}
	}
	if c.API.TLS && c.TLS.Cert == "" {
		bad("api.tls", "needs tls.ca, tls.cert and tls.key")
	}
	if c.Placement.ReplaceAfter < 0 {
		bad("placement.replace_after", "must not be negative (0: never)")
	}
	if _, err := placement.ParseLocality(c.Placement.Locality); err != nil {
		bad("placement.locality", "%v", err)
	}
	if c.Placement.LocalityDelay < 0 {
		bad("placement.locality_delay", "must not be negative")
	}
	if c.Trash.Defer < 0 {
		bad("trash.defer", "must not be negative (0: purge at once)")
	}
	if c.Trash.Sweep <= 0 {
		bad("trash.sweep", "must be positive (e.g. 1m)")
	}
	if c.Peer.Timeout <= 0 {
		bad("peer.timeout", "must be positive (e.g. 10s)")
	}
	if c.Gossip.Bind != "" {
		if err := checkAddr(c.Gossip.Bind); err != nil {
			bad("gossip.bind", "%v", err)
		}
		if c.Gossip.Advertise != "" {
			if err := checkAddr(c.Gossip.Advertise); err != nil {
				bad("gossip.advertise", "%v", err)
			}
		}
		for _, j := range c.Gossip.Join {
			if err := checkAddr(j); err != nil {
				bad("gossip.join", "%v", err)
			}
		}
		if _, err := c.Gossip.Key(); err != nil {
			bad("gossip.secret_key", "%v", err)
		}
		if c.Gossip.ProbeInterval < 0 || c.Gossip.ProbeTimeout < 0 || c.Gossip.GossipInterval < 0 || c.Gossip.SuspicionMult < 0 {
			bad("gossip", "timing knobs must not be negative")
		}
	} else if len(c.Gossip.Join) > 0 {
		bad("gossip.join", "set gossip.bind too: a node without gossip joins nobody")
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		bad("log.level", "%v", err)
	}
	if !c.Insecure {
		for _, u := range c.UnsafeSettings() {
			bad(u.Key, "%s is not a loopback address: set %s (%s), or insecure: true to start anyway", u.Addr, u.Missing, u.Risk)
		}
	}
	return errors.Join(errs...)
}

// Key decodes the gossip encryption key (nil when none is set).
func (g *GossipConfig) Key() ([]byte, error) {
	if g.SecretKey == "" {
		return nil, nil
	}
	k, err := base64.StdEncoding.DecodeString(g.SecretKey)
	if err != nil {
		return nil, errors.New("not valid base64")
	}
	if l := len(k); l != 16 && l != 24 && l != 32 {
		return nil, fmt.Errorf("decodes to %d bytes; want 16, 24 or 32", l)
	}
	return k, nil
}

// checkConsulAddr accepts IP:port or an http(s) URL.
func checkConsulAddr(a string) error {
	if strings.HasPrefix(a, "http://") || strings.HasPrefix(a, "https://") {
		u, err := url.Parse(a)
		if err != nil || u.Host == "" {
			return fmt.Errorf("%q is not a valid URL", a)
		}
		return nil
	}
	return checkAddr(a)
}

// checkAddr accepts IP:port with a literal IP and a port 1-65535.
func checkAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q: %v (want IP:port)", a, err)
	}
	if net.ParseIP(host) == nil {
		return fmt.Errorf("%q: %q is not an IP address (ukai binds exactly the address given)", a, host)
	}
	var p int
	if _, err := fmt.Sscanf(port, "%d", &p); err != nil || p < 1 || p > 65535 || fmt.Sprint(p) != port {
		return fmt.Errorf("%q: port %q must be 1-65535", a, port)
	}
	return nil
}

// checkAdvertise validates an address given to others: host:port with an
// IP that is not a wildcard, or a DNS name.
func checkAdvertise(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q: %v (want host:port)", a, err)
	}
	var p int
	if _, err := fmt.Sscanf(port, "%d", &p); err != nil || p < 1 || p > 65535 || fmt.Sprint(p) != port {
		return fmt.Errorf("%q: port %q must be 1-65535", a, port)
	}
	if ip := net.ParseIP(host); ip != nil {
		if ip.IsUnspecified() {
			return fmt.Errorf("%q: %s is a wildcard, not an address initiators can reach", a, host)
		}
		return nil
	}
	if !dnsNameRE.MatchString(host) || len(host) > 253 {
		return fmt.Errorf("%q: %q is neither an IP address nor a DNS name", a, host)
	}
	return nil
}

var dnsNameRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)

func parseLevel(s string) (slog.Level, error) {
	levels := []string{"debug", "info", "warn", "error"}
	if !slices.Contains(levels, s) {
		return 0, fmt.Errorf("%q: must be one of %s", s, strings.Join(levels, ", "))
	}
	var l slog.Level
	return l, l.UnmarshalText([]byte(s))
}

// Logger returns the logger the configuration asks for, writing to stderr.
func (c *Config) Logger() *slog.Logger { return c.LoggerLevel(new(slog.LevelVar)) }

// LoggerLevel is Logger with its level in lv, set to log.level: a reload
// changes the level by setting lv (SetLevel).
func (c *Config) LoggerLevel(lv *slog.LevelVar) *slog.Logger {
	c.SetLevel(lv)
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv})).With("node", c.Node.Name)
}

// SetLevel sets lv to log.level.
func (c *Config) SetLevel(lv *slog.LevelVar) {
	l, _ := parseLevel(c.Log.Level)
	lv.Set(l)
}

// NeedRestart names the settings that differ between c and o other than
// those a reload applies at once (log.level, api.metrics_io), by section: a reload
// reports them and they wait for the next start.
func (c *Config) NeedRestart(o *Config) []string {
	a, b := *c, *o
	a.Log.Level, b.Log.Level = "", ""
	a.API.MetricsIO, b.API.MetricsIO = false, false
	var out []string
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	for i := range va.NumField() {
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			name := va.Type().Field(i).Tag.Get("mapstructure")
			out = append(out, name)
		}
	}
	return out
}

// checkISCSILimits validates the portal's resource bounds.
func checkISCSILimits(c *ISCSIConfig, bad func(key, format string, args ...any)) {
	if c.MaxConnections < 1 {
		bad("iscsi.max_connections", "%d: must be at least 1", c.MaxConnections)
	}
	if c.MaxConnectionsPerAddress < 1 || c.MaxConnectionsPerAddress > c.MaxConnections {
		bad("iscsi.max_connections_per_address", "%d: must be between 1 and iscsi.max_connections (%d)", c.MaxConnectionsPerAddress, c.MaxConnections)
	}
	if c.LoginTimeout < time.Second {
		bad("iscsi.login_timeout", "%v: must be at least 1s", c.LoginTimeout)
	}
	if c.DataOutTimeout < time.Second {
		bad("iscsi.data_out_timeout", "%v: must be at least 1s", c.DataOutTimeout)
	}
	// A session must be able to hold the largest write the target takes.
	if c.SessionWriteBufferMiB < iscsiMaxTransferMiB || c.SessionWriteBufferMiB > 1<<20 {
		bad("iscsi.session_write_buffer_mib", "%d: must be between %d (the largest write) and 1048576", c.SessionWriteBufferMiB, iscsiMaxTransferMiB)
	}
	if c.WriteBufferMiB < c.SessionWriteBufferMiB || c.WriteBufferMiB > 1<<20 {
		bad("iscsi.write_buffer_mib", "%d: must be between iscsi.session_write_buffer_mib (%d) and 1048576", c.WriteBufferMiB, c.SessionWriteBufferMiB)
	}
	if c.ResponseQueueMiB < 1 || c.ResponseQueueMiB > 1<<20 {
		bad("iscsi.response_queue_mib", "%d: must be between 1 and 1048576", c.ResponseQueueMiB)
	}
}

// iscsiMaxTransferMiB is the largest write the portal buffers (the iscsi
// package's default MaxTransferLength).
const iscsiMaxTransferMiB = 32

// Unsafe is a listener beyond loopback without the protection it needs.
type Unsafe struct {
	Key     string // the listener's key: "api.listen"
	Addr    string
	Missing string // the keys that would protect it: "api.token_file"
	Risk    string // what anyone who reaches the address can do
}

func (u Unsafe) String() string {
	return fmt.Sprintf("%s %s is not a loopback address and %s is not set: %s", u.Key, u.Addr, u.Missing, u.Risk)
}

// UnsafeSettings lists the listeners bound beyond loopback (wildcards
// 0.0.0.0 and :: included) without their protection: the API without
// api.token_file, the data transport without tls.*, gossip without
// gossip.secret_key. Validate refuses them unless Insecure is set.
func (c *Config) UnsafeSettings() []Unsafe {
	var out []Unsafe
	if !isLoopback(c.API.Listen) && c.API.TokenFile == "" {
		out = append(out, Unsafe{"api.listen", c.API.Listen, "api.token_file",
			"anyone who reaches it can create, read, overwrite and delete every image"})
	}
	if c.Peer.Listen != "" && !isLoopback(c.Peer.Listen) && c.TLS.Cert == "" {
		out = append(out, Unsafe{"peer.listen", c.Peer.Listen, "tls.ca, tls.cert and tls.key",
			"anyone who reaches it can read and write every block of every image, in clear"})
	}
	if c.Gossip.Bind != "" && !isLoopback(c.Gossip.Bind) && c.Gossip.SecretKey == "" {
		out = append(out, Unsafe{"gossip.bind", c.Gossip.Bind, "gossip.secret_key",
			"anyone who reaches it can join the cluster and announce false node addresses"})
	}
	return out
}

// WarnUnsafe logs a warning per unsafe setting (insecure: true lets the
// node start with them); nothing for a safe configuration.
func (c *Config) WarnUnsafe(log *slog.Logger) {
	for _, u := range c.UnsafeSettings() {
		log.Warn("UNSAFE SETTING, allowed by insecure: true", "key", u.Key, "address", u.Addr, "missing", u.Missing, "risk", u.Risk)
	}
}

// isLoopback reports whether the IP:port a binds only loopback. Wildcards
// (0.0.0.0, ::), an empty host and anything unparsable are not.
func isLoopback(a string) bool {
	host, _, err := net.SplitHostPort(a)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
