package placement

import (
	"fmt"
	"time"
)

// ImagePolicy is what the operator wants for one image. The zero value
// asks for nothing: the image keeps the copies it has.
type ImagePolicy struct {
	// Replicas is the desired number of copies (0: keep the current count).
	Replicas int `json:"replicas,omitempty"`
	// Locations are the exact nodes that must hold the copies; when set,
	// Replicas is len(Locations).
	Locations []string `json:"locations,omitempty"`
	// PreferLabels: new copies go to nodes with these labels when any
	// qualifies (a preference, not a requirement).
	PreferLabels map[string]string `json:"prefer_labels,omitempty"`
	// SpreadBy is a label key: copies must sit on nodes with distinct
	// values of it (a requirement).
	SpreadBy string `json:"spread_by,omitempty"`
	// Relocate, when set, moves a copy: add To, fill it, then remove From
	// (or, without From, the copy the planner picks among the others).
	Relocate *Relocation `json:"relocate,omitempty"`
	// Group names the image's group: State.Groups holds its rule
	// (affinity or anti-affinity on a label), shared by every image of
	// the group.
	Group string `json:"group,omitempty"`
	// Locality: whether a copy follows the node that owns the image (its
	// VM's hypervisor); "" takes State.Locality.
	Locality Locality `json:"locality,omitempty"`
	// AllowRemote: under strict locality, nodes allowed to serve (own)
	// the image without a local in-sync copy (the operator's override).
	AllowRemote []string `json:"allow_remote,omitempty"`
}

// Locality is the data-locality policy of an image.
type Locality string

// Locality policies.
const (
	// LocalityOff: copies stay where the other rules put them.
	LocalityOff Locality = "off"
	// LocalityBestEffort: once the image has been owned by a node without
	// a copy for State.LocalityDelay, the planner adds a copy there and,
	// once it is in sync, drops the copy the replica count and spread
	// rules choose (never the owner's).
	LocalityBestEffort Locality = "best-effort"
	// LocalityStrict is best-effort, and the image is served only by a
	// node with a local in-sync copy (the data path enforces that part).
	LocalityStrict Locality = "strict"
)

// ParseLocality reads a locality policy ("" is the default).
func ParseLocality(s string) (Locality, error) {
	switch l := Locality(s); l {
	case "", LocalityOff, LocalityBestEffort, LocalityStrict:
		return l, nil
	}
	return "", fmt.Errorf("locality %q: want off, best-effort or strict", s)
}

// GroupKind is what a group's rule asks of its images' copies.
type GroupKind string

// Group rules.
const (
	// Affinity: the group's copies prefer nodes with the label value most
	// of the group's other copies have (e.g. one rack). A preference: a
	// copy is never moved for it.
	Affinity GroupKind = "affinity"
	// AntiAffinity: every copy of every image of the group sits on a
	// distinct value of the label (e.g. the replicas of a clustered
	// database's VMs on different hosts). A requirement: a copy that
	// breaks it is replaced by one on an unused value.
	AntiAffinity GroupKind = "anti-affinity"
)

// GroupRule is the rule of one group.
type GroupRule struct {
	Kind  GroupKind `json:"kind"`
	Label string    `json:"label"`
}

// Validate refuses a rule without a known kind or a label.
func (g GroupRule) Validate() error {
	if g.Kind != Affinity && g.Kind != AntiAffinity {
		return fmt.Errorf("group rule %q: want affinity or anti-affinity", g.Kind)
	}
	if g.Label == "" {
		return fmt.Errorf("group rule %s: no label key", g.Kind)
	}
	return nil
}

// GroupImage is one image of a group as the planner of another image of
// the group sees it.
type GroupImage struct {
	Name      string   `json:"name"`
	Locations []string `json:"locations"`
	// Copies is the number of copies it wants (its Replicas, or its
	// Locations' count, or, without either, its locations' count).
	Copies int `json:"copies"`
}

// Relocation is a follow-the-VM move of one copy.
type Relocation struct {
	To      string    `json:"to"`
	From    string    `json:"from,omitempty"`
	Started time.Time `json:"started"`
}

// Window is a daily time window [Start, End) in minutes after midnight,
// in the policy's time zone; End < Start crosses midnight.
type Window struct {
	Start int `json:"start"`
	End   int `json:"end"`
}

// SyncPolicy says when background sync and relocation traffic may run and
// how fast. No windows means always.
type SyncPolicy struct {
	Windows []Window `json:"windows,omitempty"`
	TZ      string   `json:"tz,omitempty"` // IANA zone, default UTC
	// MaxRate caps the copy rate in bytes per second (0: no cap).
	MaxRate int64 `json:"max_rate,omitempty"`
	// AllOf, when set, narrows the windows: the policy is open only when
	// its own windows and every policy listed here are open (an
	// intersection). EffectiveSync builds it when several nodes involved
	// in a sync each have a policy; operators normally leave it empty.
	AllOf []SyncPolicy `json:"all_of,omitempty"`
}

// NodeInfo is the membership's view of a node as the planner needs it.
type NodeInfo struct {
	Name      string            `json:"name"`
	Alive     bool              `json:"alive"`
	DeadSince time.Time         `json:"dead_since,omitzero"` // when it was last seen alive, if not Alive
	Labels    map[string]string `json:"labels,omitempty"`
	Free      int64             `json:"free"` // bytes free in its data dir
	// Cordoned: no new copy goes there (the operator's `node cordon`, or
	// a drain).
	Cordoned bool `json:"cordoned,omitempty"`
	// Draining: every copy there is replaced by one elsewhere and then
	// removed (implies Cordoned).
	Draining bool `json:"draining,omitempty"`
	// DrainNow: the drain's copies ignore sync windows and rate caps.
	DrainNow bool `json:"drain_now,omitempty"`
}

// ImageState is one image as the planner sees it.
type ImageState struct {
	Name      string
	Size      int64
	BlockSize int64
	Locations []string
	// Maps holds the block map of every location.
	Maps   map[string]*BlockMap
	Policy ImagePolicy
	// Sync is the image's own sync policy, if the operator set one.
	Sync *SyncPolicy
	// Owner is the node that owns the image (serves its I/O) and
	// OwnerSince when it started to, as the planning node knows them;
	// used by locality.
	Owner      string
	OwnerSince time.Time
	// SyncPaused: the operator paused the image's background sync (ukai
	// image sync --pause); its copies wait.
	SyncPaused bool
}

// State is everything the planner decides from.
type State struct {
	Images []ImageState
	Nodes  []NodeInfo
	// Default applies where neither the image nor a node has a sync
	// policy; PerNode applies to syncs from or to that node (caps are per
	// node across all its images).
	Default SyncPolicy
	PerNode map[string]SyncPolicy
	// ReplaceAfter: a copy on a node dead longer than this is replaced by
	// a new one elsewhere (0: never; the operator decides).
	ReplaceAfter time.Duration
	// Groups are the rules of the groups by name; GroupImages the images
	// of each group (the planned image may be among them: it is skipped).
	Groups      map[string]GroupRule
	GroupImages map[string][]GroupImage
	// Locality applies to images whose policy does not say; an image
	// gets a copy on its owner once owned there for LocalityDelay.
	Locality      Locality
	LocalityDelay time.Duration
	Now           time.Time
}

// ActionKind is what an action does.
type ActionKind string

// Actions the planner can ask for.
const (
	// AddLocation adds a copy on Node (it starts out of sync).
	AddLocation ActionKind = "add_location"
	// Sync copies Blocks [From, To) of the image to Node's copy from an
	// in-sync copy, at most Rate bytes/s (0: unlimited), until Deadline
	// (the end of the current window; zero: none).
	Sync ActionKind = "sync"
	// RemoveLocation removes Node's copy: every block has another in-sync
	// copy.
	RemoveLocation ActionKind = "remove_location"
	// Wait: something is wanted but not allowed now (outside a window, a
	// copy not yet in sync); Until is when it may be, if known.
	Wait ActionKind = "wait"
	// Refuse: the policy cannot be met (no node qualifies, ...).
	Refuse ActionKind = "refuse"
	// SetReplicas records Count as the image's Replicas: an image without
	// a replica count is about to lose a copy to a drain, a dead node or
	// a misplacement, or gain one for locality, and the count it had must
	// be kept while the copies move. Nothing else is planned for the
	// image's copies until it is recorded.
	SetReplicas ActionKind = "set_replicas"
)

// Action is one step of a plan, with the reason for it.
type Action struct {
	Kind     ActionKind `json:"kind"`
	Image    string     `json:"image"`
	Node     string     `json:"node,omitempty"`
	From     int64      `json:"from_block,omitempty"`
	To       int64      `json:"to_block,omitempty"`
	Rate     int64      `json:"rate,omitempty"`
	Deadline time.Time  `json:"deadline,omitzero"`
	Until    time.Time  `json:"until,omitzero"`
	Count    int        `json:"count,omitempty"`
	Reason   string     `json:"reason"`
}
