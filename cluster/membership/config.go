package membership

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"
)

// Config configures an [Agent]. Start from [DefaultConfig] and set Name,
// Bind and (for every node but the first) Join. Zero timing fields are
// replaced by the defaults of [DefaultConfig], so a partly filled Config
// is valid too.
type Config struct {
	// Name is the node name. It must be unique in the cluster: New refuses
	// to join a cluster where a live node already uses it at another
	// address (see [NameConflictError]).
	Name string

	// Bind is the "ip:port" the agent listens on, for both UDP (gossip,
	// probes) and TCP (push/pull state syncs, leave intents). It is bound
	// exactly; port 0 picks a free port (tests), reported by [Agent.Addr].
	Bind string

	// Advertise is the optional "ip:port" other nodes use to reach this
	// one (NAT, containers). Empty means Bind (after port 0 resolution).
	Advertise string

	// Join lists seed "ip:port"s. New contacts each once and fails with a
	// [*JoinError] if none answers. Empty means this is the first node of
	// a new cluster; [Agent.Rejoin] joins (or merges) later.
	Join []string

	// SecretKey, when set, encrypts and authenticates all gossip with
	// AES-GCM; it must be 16, 24 or 32 bytes (AES-128/192/256). Nodes
	// with different keys (or one with and one without) cannot talk to
	// each other. The node configuration carries it in base64: see
	// [DecodeSecretKey].
	SecretKey []byte

	// ProbeInterval is how often each node probes one other node (picked
	// round-robin in a shuffled order) with a UDP ping. It is also the
	// unit of the suspicion timeout. Default 1 s (memberlist LAN).
	ProbeInterval time.Duration

	// ProbeTimeout is how long a direct ping waits for its ack before the
	// node asks others for indirect pings. Must be below ProbeInterval;
	// it should be above the 99th percentile RTT. Default 500 ms (LAN).
	ProbeTimeout time.Duration

	// GossipInterval is how often each node sends queued broadcasts
	// (alive, suspect, dead, meta updates) to 3 random nodes. Lower means
	// faster propagation and more packets. Default 200 ms (LAN).
	GossipInterval time.Duration

	// PushPullInterval is how often each node does a full TCP state sync
	// with one random node (anti-entropy; memberlist scales it up for
	// clusters above 32 nodes). Default 30 s (LAN).
	PushPullInterval time.Duration

	// SuspicionMult sets how long a suspect node has to refute before it
	// is declared dead: SuspicionMult * max(1, log10(N)) * ProbeInterval
	// once enough other nodes confirm the suspicion, at most
	// SuspicionMaxTimeoutMult times that without confirmations.
	// Default 3 (memberlist LAN says 4): a killed node is suspected about
	// 1-2 s after it stops and declared dead 3 s (N <= 10) to 5.4 s
	// (N = 64) later, 7.5 s at N = 316, so every node reports it dead
	// within 10 s for clusters up to a few hundred nodes.
	SuspicionMult int

	// SuspicionMaxTimeoutMult bounds the suspicion timeout when no other
	// node confirms the suspicion (Lifeguard). Default 2 (memberlist LAN
	// says 6, which lets an unconfirmed suspicion last 24 s and breaks the
	// 10 s bound in small clusters).
	SuspicionMaxTimeoutMult int

	// EventBuffer is the capacity of the [Agent.Events] channel. When it
	// is full the oldest event is dropped. Default 1024.
	EventBuffer int

	// Logger receives the agent's logs. memberlist's own log lines are
	// all passed at slog.LevelDebug. Nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig returns a Config with the default timing knobs (see each
// field), bound to 127.0.0.1:7946. Set Name, Bind and Join.
func DefaultConfig() Config {
	lan := memberlist.DefaultLANConfig()
	return Config{
		Bind:                    "127.0.0.1:7946",
		ProbeInterval:           lan.ProbeInterval,    // 1 s
		ProbeTimeout:            lan.ProbeTimeout,     // 500 ms
		GossipInterval:          lan.GossipInterval,   // 200 ms
		PushPullInterval:        lan.PushPullInterval, // 30 s
		SuspicionMult:           3,
		SuspicionMaxTimeoutMult: 2,
		EventBuffer:             1024,
	}
}

// DecodeSecretKey decodes the base64 key of the node configuration and
// checks its length (16, 24 or 32 bytes).
func DecodeSecretKey(b64 string) ([]byte, error) {
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("membership: secret key is not base64: %w", err)
	}
	if err := checkKey(key); err != nil {
		return nil, err
	}
	return key, nil
}

func checkKey(key []byte) error {
	switch len(key) {
	case 0, 16, 24, 32:
		return nil
	}
	return fmt.Errorf("membership: secret key is %d bytes, want 16, 24 or 32", len(key))
}

// withDefaults fills zero fields and validates the result.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if c.ProbeInterval <= 0 {
		c.ProbeInterval = d.ProbeInterval
	}
	if c.ProbeTimeout <= 0 {
		c.ProbeTimeout = d.ProbeTimeout
	}
	if c.GossipInterval <= 0 {
		c.GossipInterval = d.GossipInterval
	}
	if c.PushPullInterval <= 0 {
		c.PushPullInterval = d.PushPullInterval
	}
	if c.SuspicionMult <= 0 {
		c.SuspicionMult = d.SuspicionMult
	}
	if c.SuspicionMaxTimeoutMult <= 0 {
		c.SuspicionMaxTimeoutMult = d.SuspicionMaxTimeoutMult
	}
	if c.EventBuffer <= 0 {
		c.EventBuffer = d.EventBuffer
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Name == "" {
		return c, errors.New("membership: Config.Name is empty")
	}
	if c.ProbeTimeout >= c.ProbeInterval {
		return c, fmt.Errorf("membership: ProbeTimeout %v must be below ProbeInterval %v", c.ProbeTimeout, c.ProbeInterval)
	}
	if err := checkKey(c.SecretKey); err != nil {
		return c, err
	}
	if _, _, err := splitHostPort("Bind", c.Bind); err != nil {
		return c, err
	}
	if c.Advertise != "" {
		if _, _, err := splitHostPort("Advertise", c.Advertise); err != nil {
			return c, err
		}
	}
	return c, nil
}

// splitHostPort parses an "ip:port" with a literal IP address.
func splitHostPort(field, s string) (string, int, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("membership: Config.%s %q: %w", field, s, err)
	}
	if net.ParseIP(host) == nil {
		return "", 0, fmt.Errorf("membership: Config.%s %q: %q is not an IP address", field, s, host)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("membership: Config.%s %q: bad port", field, s)
	}
	return host, int(p), nil
}

// memberlistConfig translates c (already defaulted) into memberlist's.
func (c Config) memberlistConfig() *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.Name
	mc.BindAddr, mc.BindPort, _ = splitHostPort("Bind", c.Bind)
	mc.AdvertiseAddr, mc.AdvertisePort = "", mc.BindPort
	if c.Advertise != "" {
		mc.AdvertiseAddr, mc.AdvertisePort, _ = splitHostPort("Advertise", c.Advertise)
	}
	mc.ProbeInterval = c.ProbeInterval
	mc.ProbeTimeout = c.ProbeTimeout
	mc.GossipInterval = c.GossipInterval
	mc.PushPullInterval = c.PushPullInterval
	mc.SuspicionMult = c.SuspicionMult
	mc.SuspicionMaxTimeoutMult = c.SuspicionMaxTimeoutMult
	if len(c.SecretKey) > 0 {
		mc.SecretKey = append([]byte(nil), c.SecretKey...)
	}
	// A name whose node is dead may be taken over at a new address at
	// once (a node replaced on other hardware); memberlist's default (0)
	// would refuse that until the dead node is reaped.
	mc.DeadNodeReclaimTime = time.Nanosecond
	mc.Logger = newMemberlistLogger(c.Logger)
	return mc
}
