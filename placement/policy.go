package placement

import "time"

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
	Now          time.Time
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
	Reason   string     `json:"reason"`
}
