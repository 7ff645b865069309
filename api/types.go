// Package api is ukai's control API: HTTP/JSON under versioned paths
// (/v1/...), the handlers over a Service, and the client the CLI and the
// OpenStack driver use.
package api

import (
	"time"
)

// CreateImageRequest is the body of POST /v1/images.
type CreateImageRequest struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
	// BlockSize in bytes; 0 means the default (4 MiB).
	BlockSize int64 `json:"block_size,omitempty"`
	// Locations are the nodes holding a copy; empty means the node that
	// receives the request.
	Locations []string `json:"locations,omitempty"`
	// MinCopies: a write reaching fewer in-sync copies fails (default 1).
	MinCopies int `json:"min_copies,omitempty"`
	// Source, when set, names a snapshot (the new image holds its data)
	// or an image (a crash-consistent clone of it now). Size 0 then means
	// the source's size; block size, locations and min copies default to
	// the source's.
	Source string `json:"source,omitempty"`
}

// TrashEntry is an image in the trash.
type TrashEntry struct {
	ID         string    `json:"id"`
	Name       string    `json:"name"`
	Size       int64     `json:"size"`
	Locations  []string  `json:"locations"`
	Deleted    time.Time `json:"deleted"`
	PurgeAfter time.Time `json:"purge_after"`
}

// RestoreRequest is POST /v1/trash/{ref}/restore.
type RestoreRequest struct {
	// Name to restore under (the image's own when empty).
	Name string `json:"name,omitempty"`
}

// SnapshotRequest is POST /v1/images/{name}/snapshots.
type SnapshotRequest struct {
	Name string `json:"name"`
}

// Snapshot is a point-in-time view of an image.
type Snapshot struct {
	// Name is the snapshot's own name (s1); FullName names it anywhere
	// (vm1@s1): snapshots are named per image.
	Name      string    `json:"name"`
	FullName  string    `json:"full_name"`
	ID        string    `json:"id"`
	Image     string    `json:"image"` // the image it was taken of
	Size      int64     `json:"size"`
	BlockSize int64     `json:"block_size"`
	Created   time.Time `json:"created"`
	Locations []string  `json:"locations"`
	// PreservedBlocks counts the blocks the image changed since, whose
	// old data the snapshot holds itself (copy on write).
	PreservedBlocks int64 `json:"preserved_blocks"`
	// IOPausedUS, in the answer to a create: how long writes to the image
	// waited while the snapshot was taken (microseconds).
	IOPausedUS int64 `json:"io_paused_us,omitempty"`
}

// ResizeRequest is POST /v1/images/{name}/resize.
type ResizeRequest struct {
	Size int64 `json:"size"`
}

// DiffOptions are PUT /v1/images/{name}/diff's query: force applies a
// diff whose starting snapshot the image does not have; noSnapshot takes
// no snapshot of the diff's end.
type DiffOptions struct {
	Force      bool
	NoSnapshot bool
}

// DiffApplied answers PUT /v1/images/{name}/diff.
type DiffApplied struct {
	// Snapshot is the snapshot taken of the image at the diff's end
	// (IMAGE@TO), so that the next diff applies on it.
	Snapshot string `json:"snapshot,omitempty"`
	From     string `json:"from,omitempty"` // the stream's snapshots
	To       string `json:"to,omitempty"`
	Size     int64  `json:"size"`    // the stream's image size
	Written  int64  `json:"written"` // bytes of data written
	Zeroed   int64  `json:"zeroed"`  // bytes unmapped or written with zeros
}

// DataWritten is the answer of PUT /v1/images/{name}/data.
type DataWritten struct {
	Bytes int64 `json:"bytes"`
}

// LocationRequest is POST /v1/images/{name}/locations.
type LocationRequest struct {
	Node string `json:"node"`
}

// SyncRequest is POST /v1/images/{name}/sync.
type SyncRequest struct {
	FromBlock int64 `json:"from_block"`
	ToBlock   int64 `json:"to_block"` // exclusive; 0 = to the end
	// Pause/Resume switch the background synchronizer instead of syncing.
	Pause  bool `json:"pause,omitempty"`
	Resume bool `json:"resume,omitempty"`
	// Now syncs even outside the image's sync window (caps still hold).
	Now bool `json:"now,omitempty"`
}

// ImagePolicyRequest is PUT /v1/images/{name}/policy: only the fields set
// change.
type ImagePolicyRequest struct {
	Replicas     *int              `json:"replicas,omitempty"`
	Locations    []string          `json:"locations,omitempty"`
	PreferLabels map[string]string `json:"prefer_labels,omitempty"`
	SpreadBy     *string           `json:"spread_by,omitempty"`
	// Group ("" leaves the group) and Locality (off, best-effort,
	// strict; "" takes the cluster default).
	Group    *string `json:"group,omitempty"`
	Locality *string `json:"locality,omitempty"`
	// AllowRemote: nodes that may serve the image without a local copy
	// under strict locality (an empty list clears).
	AllowRemote *[]string `json:"allow_remote,omitempty"`
}

// RelocateRequest is POST /v1/images/{name}/relocate.
type RelocateRequest struct {
	To     string `json:"to,omitempty"`
	From   string `json:"from,omitempty"`
	Cancel bool   `json:"cancel,omitempty"`
}

// SyncPolicyRequest is PUT /v1/policies/sync.
//
// Only what is given changes: windows (all of them), the time zone, the
// rate; ClearWindows and ClearRate remove one field; Clear removes the
// whole policy. The scope's image or node must exist.
type SyncPolicyRequest struct {
	Scope        string   `json:"scope"` // default, node:NAME, image:NAME
	Windows      []string `json:"windows,omitempty"`
	TZ           string   `json:"tz,omitempty"`
	MaxRate      string   `json:"max_rate,omitempty"`
	Clear        bool     `json:"clear,omitempty"`
	ClearWindows bool     `json:"clear_windows,omitempty"`
	ClearRate    bool     `json:"clear_rate,omitempty"`
}

// SyncPolicies is GET /v1/policies/sync.
type SyncPolicies struct {
	Default  *SyncPolicy           `json:"default,omitempty"`
	Nodes    map[string]SyncPolicy `json:"nodes"`
	Images   map[string]SyncPolicy `json:"images"`
	Problems []string              `json:"problems,omitempty"`
}

// Stats is GET /v1/stats: what this node moved since it started.
type Stats struct {
	Node         string `json:"node"`
	PeerBytesIn  int64  `json:"peer_bytes_in"`  // block data written to this node's copies by other nodes
	PeerBytesOut int64  `json:"peer_bytes_out"` // block data read from this node's copies by other nodes
	SyncBytes    int64  `json:"sync_bytes"`     // bytes this node copied while synchronizing
	// PlacementRounds counts the executor's planning rounds.
	PlacementRounds int64 `json:"placement_rounds"`
	Sessions        int   `json:"sessions"`
	Images          int   `json:"images_exported"`
	// Settled counts the images whose last plan on this node found every
	// copy in sync and nothing to do; the executor leaves them alone
	// until something they depend on moves.
	Settled int `json:"images_settled"`
}

// SyncProgress is one line of the NDJSON stream POST .../sync answers.
type SyncProgress struct {
	Node       string  `json:"node,omitempty"`  // destination copy of the last block
	Block      int64   `json:"block"`           // last block handled
	Done       int64   `json:"done"`            // blocks handled so far
	Total      int64   `json:"total"`           // out-of-sync blocks to handle
	Copied     int64   `json:"copied"`          // blocks whose data moved
	Bytes      int64   `json:"bytes"`           // bytes moved
	RateBps    float64 `json:"rate_bps"`        // bytes per second so far
	Final      bool    `json:"final,omitempty"` // the summary line
	Error      string  `json:"error,omitempty"`
	OutOfSync  int64   `json:"out_of_sync"` // blocks still out of sync (final line)
	ElapsedSec float64 `json:"elapsed_sec"`
}

// VerifyResult is POST /v1/images/{name}/verify.
type VerifyResult struct {
	Blocks      int64      `json:"blocks"`
	Compared    int64      `json:"compared"` // blocks with at least two in-sync copies compared
	Mismatches  []Mismatch `json:"mismatches"`
	Unreachable []string   `json:"unreachable,omitempty"`
}

// Mismatch is a block whose in-sync copies differ.
type Mismatch struct {
	Block int64             `json:"block"`
	Sums  map[string]string `json:"sums"` // node -> hex SHA-256
}

// Image is an image as GET /v1/images and /v1/images/{name} show it.
type Image struct {
	Name       string    `json:"name"`
	ID         string    `json:"id"`
	Size       int64     `json:"size"`
	BlockSize  int64     `json:"block_size"`
	Blocks     int64     `json:"num_blocks"`
	Created    time.Time `json:"created"`
	IQN        string    `json:"iqn"`
	MinCopies  int       `json:"min_copies"`
	Owner      string    `json:"owner,omitempty"`    // node serving the image's I/O now
	Attached   string    `json:"attached,omitempty"` // node an orchestrator attached it to
	Generation uint64    `json:"generation"`
	SyncPaused bool      `json:"sync_paused,omitempty"`
	QoS        *QoS      `json:"qos,omitempty"` // I/O limits (api/qos.go)
	// Exports lists who may log in (no secrets).
	Exports []ExportInfo `json:"exports,omitempty"`
	// Policy is the desired state; Plan what the planner last decided.
	Policy *ImagePolicy `json:"policy,omitempty"`
	// SnapshotOf is set on a snapshot: the image it was taken of.
	SnapshotOf string `json:"snapshot_of,omitempty"`
	// Snapshots of this image.
	Snapshots []string   `json:"snapshots,omitempty"`
	Plan      []Action   `json:"plan,omitempty"`
	Locations []Location `json:"locations"`
	// BlockMap, only with ?blocks=true: one entry per block mapping each
	// location's node to its state.
	BlockMap []map[string]BlockState `json:"blocks,omitempty"`
	// Runs, only with ?blocks=runs: the block map as runs.
	Runs []BlockRun `json:"runs,omitempty"`
}

// Location is one copy of an image and how much of it is not in sync.
type Location struct {
	Node      string `json:"node"`
	OutOfSync int64  `json:"out_of_sync"`
	Syncing   int64  `json:"syncing"`
}

// BlockState is the state of one block of one location: 0 in sync,
// 1 syncing, 2 out of sync.
type BlockState struct {
	SyncStatus int `json:"sync_status"`
}

// ImageList is GET /v1/images. Problems lists records that could not be
// read (malformed metadata), each naming its key.
type ImageList struct {
	Images   []Image  `json:"images"`
	Problems []string `json:"problems,omitempty"`
}

// Node is a member of the cluster (GET /v1/nodes, /v1/nodes/{name}), or the
// answering node itself (GET /v1/node, which adds IQNPrefix, Metadata,
// Exported, Sessions and StartedAt).
type Node struct {
	Name       string            `json:"name"`
	State      string            `json:"state"` // alive, suspect, dead, left
	Since      time.Time         `json:"since"` // when State last changed, as seen by the answering node
	GossipAddr string            `json:"gossip_addr,omitempty"`
	APIAddr    string            `json:"api_addr"`
	ISCSIAddr  string            `json:"iscsi_addr"`
	PeerAddr   string            `json:"peer_addr,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
	// The operator's state: no new copy goes to a cordoned node; a
	// draining one (also cordoned) has its copies moved away.
	Cordoned bool   `json:"cordoned,omitempty"`
	Draining bool   `json:"draining,omitempty"`
	Capacity int64  `json:"capacity_bytes"`
	Free     int64  `json:"free_bytes"`
	Version  string `json:"version,omitempty"`
	// Images with a copy on the node, from the catalog; null when the
	// metadata store could not be read.
	Images []string `json:"images"`

	IQNPrefix string    `json:"iqn_prefix,omitempty"`
	Metadata  string    `json:"metadata_backend,omitempty"`
	Exported  []string  `json:"exported,omitempty"`
	Sessions  []Session `json:"sessions,omitempty"`
	StartedAt time.Time `json:"started_at,omitempty"`
}

// Session is one iSCSI session on the node.
type Session struct {
	Initiator string `json:"initiator"`
	ISID      string `json:"isid"`
	Target    string `json:"target"`
	Remote    string `json:"remote"`
	Commands  uint64 `json:"commands"`
	BytesIn   uint64 `json:"bytes_in"`
	BytesOut  uint64 `json:"bytes_out"`
}

// Version is GET /v1/version.
type Version struct {
	Version string `json:"version"`
	API     string `json:"api"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

// ExportRequest is POST /v1/images/{name}/exports: allow an initiator, with
// optional CHAP. Secrets travel in the body (over TLS when the API uses
// it), never in URLs; a secret is stored per the node's
// iscsi.chap_secret_store, or named by *SecretFile (a file every node keeps
// in iscsi.chap_secrets_dir).
type ExportRequest struct {
	Initiator        string `json:"initiator"`
	CHAPUser         string `json:"chap_user,omitempty"`
	CHAPSecret       string `json:"chap_secret,omitempty"`
	CHAPSecretFile   string `json:"chap_secret_file,omitempty"`
	MutualUser       string `json:"mutual_user,omitempty"`
	MutualSecret     string `json:"mutual_secret,omitempty"`
	MutualSecretFile string `json:"mutual_secret_file,omitempty"`
}

// ExportInfo is an export as shown: secrets never appear.
type ExportInfo struct {
	Initiator  string `json:"initiator"`
	CHAPUser   string `json:"chap_user,omitempty"`
	MutualUser string `json:"mutual_user,omitempty"`
	SecretIn   string `json:"secret_in,omitempty"` // "consul" or "file:<name>"
}

// The operator's placement decisions and the executor's plan, as the API
// carries them (the same JSON as the placement package stores; the API
// has its own types so that its clients do not depend on the planner).

// ImagePolicy is an image's placement policy.
type ImagePolicy struct {
	Replicas     int               `json:"replicas,omitempty"`
	Locations    []string          `json:"locations,omitempty"`
	PreferLabels map[string]string `json:"prefer_labels,omitempty"`
	SpreadBy     string            `json:"spread_by,omitempty"`
	Relocate     *Relocation       `json:"relocate,omitempty"`
	Group        string            `json:"group,omitempty"`
	Locality     string            `json:"locality,omitempty"`
	AllowRemote  []string          `json:"allow_remote,omitempty"`
}

// Relocation is a relocation under way.
type Relocation struct {
	To      string    `json:"to"`
	From    string    `json:"from,omitempty"`
	Started time.Time `json:"started"`
}

// Window is a daily sync window, minutes after midnight (End < Start
// wraps past midnight).
type Window struct {
	Start int `json:"start"`
	End   int `json:"end"`
}

// SyncPolicy says when and how fast synchronization may run.
type SyncPolicy struct {
	Windows []Window     `json:"windows,omitempty"`
	TZ      string       `json:"tz,omitempty"`
	MaxRate int64        `json:"max_rate,omitempty"`
	AllOf   []SyncPolicy `json:"all_of,omitempty"`
}

// Action kinds of a plan.
const (
	ActionAddLocation    = "add_location"
	ActionSync           = "sync"
	ActionRemoveLocation = "remove_location"
	ActionWait           = "wait"
	ActionRefuse         = "refuse"
	ActionSetReplicas    = "set_replicas"
)

// Action is one step of an image's placement plan.
type Action struct {
	Kind     string    `json:"kind"`
	Image    string    `json:"image"`
	Node     string    `json:"node,omitempty"`
	From     int64     `json:"from_block,omitempty"`
	To       int64     `json:"to_block,omitempty"`
	Rate     int64     `json:"rate,omitempty"`
	Deadline time.Time `json:"deadline,omitzero"`
	Until    time.Time `json:"until,omitzero"`
	Count    int       `json:"count,omitempty"`
	Reason   string    `json:"reason"`
}

// DrainRequest is POST /v1/nodes/{name}/drain.
type DrainRequest struct {
	// Now: the drain's copies ignore sync windows and rate caps.
	Now bool `json:"now,omitempty"`
	// MoveOwners hands the images the node owns to other nodes at once
	// (else they move when their VMs do).
	MoveOwners bool `json:"move_owners,omitempty"`
}

// CordonRequest is PUT /v1/nodes/{name}/cordon.
type CordonRequest struct {
	Cordoned bool `json:"cordoned"`
	// MoveOwners (cordon only) hands the images the node owns to other
	// nodes now; uncordon hands them back.
	MoveOwners bool `json:"move_owners,omitempty"`
}

// NodeOperation is the operator's state of a node and, while it is
// draining, the drain's progress (GET /v1/nodes/{name}/drain).
type NodeOperation struct {
	Node     string `json:"node"`
	Cordoned bool   `json:"cordoned"`
	Draining bool   `json:"draining"`
	// While draining:
	Started time.Time `json:"started,omitzero"`
	Now     bool      `json:"now,omitempty"`
	// Total images the drain moves (those with a copy on the node when it
	// started, and any added since); Done those without one now.
	Total     int          `json:"total"`
	Done      int          `json:"done"`
	BytesLeft int64        `json:"bytes_left"`
	Images    []DrainImage `json:"images,omitempty"`
	// Owners moved away (image: node), and those that could not be.
	Moved       map[string]string `json:"moved,omitempty"`
	OwnerErrors []string          `json:"owner_errors,omitempty"`
}

// DrainImage is one image a drain still has to move.
type DrainImage struct {
	Name      string `json:"name"`
	BytesLeft int64  `json:"bytes_left"`
	// Blocked: the drain cannot finish for this image (the planner's
	// refusal); Waiting: it waits (a sync window, a copy not yet in
	// sync with nothing to sync from, ...).
	Blocked string `json:"blocked,omitempty"`
	Waiting string `json:"waiting,omitempty"`
}

// Group is a group of images and its rule (PUT /v1/groups/{name}).
type Group struct {
	Name   string   `json:"name"`
	Kind   string   `json:"kind"` // affinity or anti-affinity
	Label  string   `json:"label"`
	Images []string `json:"images,omitempty"`
}

// BlockView says what GET /v1/images/{name} adds about blocks: nothing,
// the full per-block map (?blocks=true), or runs (?blocks=runs, with
// &cells=N to draw at most N cells per location).
type BlockView struct {
	Full  bool
	Runs  bool
	Cells int64
}

// BlockRun is a range of blocks [First, Last] over which each location
// has one state (0 in sync, 1 syncing, 2 out of sync). With cells, a
// state is the worst of the run's blocks.
type BlockRun struct {
	First  int64          `json:"first"`
	Last   int64          `json:"last"`
	States map[string]int `json:"states"`
}

// Health is GET /v1/health: whether this node can serve. It is open
// (like /v1/version) and says nothing about images.
type Health struct {
	Node   string        `json:"node"`
	Status string        `json:"status"` // ok, or failing
	Checks []HealthCheck `json:"checks"`
}

// HealthCheck is one check of a Health answer.
type HealthCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// ClusterStatus is GET /v1/status: the cluster's health as the answering
// node sees it (`ukai status`).
type ClusterStatus struct {
	Node     string      `json:"node"` // the answering node
	Time     time.Time   `json:"time"`
	Nodes    NodeCounts  `json:"nodes"`
	Images   ImageCounts `json:"images"`
	Problems []Problem   `json:"problems"`
	// OutOfSyncBytes is the copy data not in sync; BacklogETASec the time
	// to sync what can be synced now at the nodes' caps, sync windows
	// not counted (-1: some of it has no cap; or all of it waits for a
	// dead node or a paused sync).
	OutOfSyncBytes int64   `json:"out_of_sync_bytes"`
	BacklogETASec  float64 `json:"backlog_eta_sec"`
	// Activity is what is pending, by kind (sync, sync_paused, add_copy,
	// remove_copy, drain), counted over images (drain: over nodes).
	Activity map[string]int `json:"activity"`
	// Healthy is false when something needs an operator (Problems).
	Healthy bool `json:"healthy"`
}

// NodeCounts counts the membership by state.
type NodeCounts struct {
	Total    int `json:"total"`
	Alive    int `json:"alive"`
	Suspect  int `json:"suspect"`
	Dead     int `json:"dead"`
	Left     int `json:"left"`
	Cordoned int `json:"cordoned"`
	Draining int `json:"draining"`
}

// ImageCounts counts images (snapshots apart) by health.
type ImageCounts struct {
	Total int `json:"total"`
	// Degraded: fewer copies in sync on live nodes than wanted.
	Degraded int `json:"degraded"`
	// Unavailable: some block has no in-sync copy on a live node.
	Unavailable int `json:"unavailable"`
	// Ownerless: attached to, or owned by, a node that is not alive.
	Ownerless int `json:"ownerless"`
	Snapshots int `json:"snapshots"`
}

// Problem is one thing that needs an operator.
type Problem struct {
	Kind   string `json:"kind"` // node_dead, degraded, unavailable, ownerless, unreadable
	Image  string `json:"image,omitempty"`
	Node   string `json:"node,omitempty"`
	Detail string `json:"detail"`
}

// IOStat is GET /v1/iostat: the I/O counters of the images that saw I/O
// through the answering node since it started.
type IOStat struct {
	Node string    `json:"node"`
	Time time.Time `json:"time"`
	// Counting is false when the node does not count image I/O
	// (api.metrics_io false): its counters are frozen, not idle.
	Counting bool      `json:"counting"`
	Images   []ImageIO `json:"images"`
}

// ImageIO is one image's I/O counters on one node.
type ImageIO struct {
	Image      string `json:"image"`
	Owner      string `json:"owner,omitempty"`
	ReadOps    int64  `json:"read_ops"`
	WriteOps   int64  `json:"write_ops"`
	ReadBytes  int64  `json:"read_bytes"`
	WriteBytes int64  `json:"write_bytes"`
	ReadNanos  int64  `json:"read_latency_ns_sum"`
	WriteNanos int64  `json:"write_latency_ns_sum"`
	Errors     int64  `json:"errors"`
}

// CopyProgress is one line of the NDJSON stream POST /v1/images?progress=true
// answers for a clone or a copy of a snapshot: bytes of the source done so
// far, then a final line with the image or the error (and its HTTP status).
type CopyProgress struct {
	Done  int64  `json:"done_bytes"`
	Total int64  `json:"total_bytes"`
	Final bool   `json:"final,omitempty"`
	Image *Image `json:"image,omitempty"`
	Error string `json:"error,omitempty"`
	Code  int    `json:"code,omitempty"`
}
