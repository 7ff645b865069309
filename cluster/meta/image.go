package meta

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// RecordVersion is the version of the image record format this code writes
// and understands. A record with another version is reported, never
// rewritten.
const RecordVersion = 1

// ErrInvalid is wrapped by every validation error: the caller's input is
// wrong, retrying will not help.
var ErrInvalid = errors.New("invalid argument")

// Limits on image geometry.
const (
	MinBlockSize     = 64 << 10
	MaxBlockSize     = 64 << 20
	DefaultBlockSize = 4 << 20
	// SectorSize is the logical block size the LUN exposes; image sizes
	// are multiples of it.
	SectorSize = 512
)

// Image is the record of one disk image.
type Image struct {
	Version int `json:"version"`
	// ID is random and new for every creation: a deleted and recreated
	// image of the same name never shares data files or block maps.
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	BlockSize int64     `json:"block_size"`
	Created   time.Time `json:"created"`
	// Locations are the nodes holding a copy, in the order they were
	// added. Each has a block map under blockmaps/<id>/<node>/.
	Locations []string `json:"locations"`
	// MinCopies is how many copies a write must reach to be acknowledged.
	MinCopies int `json:"min_copies"`
	// Generation grows with every change of Owner; requests to copies
	// carry it, and a copy refuses a generation older than one it saw.
	Generation uint64 `json:"generation"`
	// Owner is the node that serves the image's I/O: it alone writes the
	// copies, updates the block maps and synchronizes. Empty: nobody.
	// It is written only when ownership changes hands; holding it is
	// holding the image's ownership lock (owners/<id>, see owner.go).
	// Records of earlier versions carried a lease_expires the owner
	// rewrote every few seconds; it is ignored.
	Owner string `json:"owner,omitempty"`
	// Attached is the node an orchestrator attached the image to
	// (`ukai image attach`): it keeps ownership until detached, even
	// without sessions.
	Attached string `json:"attached,omitempty"`
	// SyncPaused stops the background synchronizer for this image.
	SyncPaused bool `json:"sync_paused,omitempty"`
	// Origin is set on a snapshot: the image it is a point-in-time view
	// of. A snapshot's copies hold only the blocks the origin overwrote
	// since (copy on write); the others are read from the origin. See
	// CowNode.
	Origin *Origin `json:"origin,omitempty"`
	// Snapshots are the live snapshots of this image: its owner preserves
	// a block into each of them before the block first changes.
	Snapshots []SnapshotRef `json:"snapshots,omitempty"`
	// QoS limits the image's I/O on its owner (qos.go); nil: unlimited.
	QoS *QoS `json:"qos,omitempty"`

	// Rev orders records read from the store (its modify index; a lower
	// bound after an update): a node never applies a record older than
	// one it already holds. 0: unknown (a cached record).
	Rev uint64 `json:"-"`
}

// Origin names the image a snapshot was taken of.
type Origin struct {
	Name string `json:"name"`
	ID   string `json:"id"`
}

// SnapshotRef names a snapshot in its origin's record.
type SnapshotRef struct {
	Name string `json:"name"`
	ID   string `json:"id"`
}

// CowNode is the pseudo-location under which a snapshot's copy-on-write
// map is stored (blockmaps/<snapshot id>/.cow/): a block InSync there is
// held by the snapshot's copies, OutOfSync means it is still the origin's.
// No node can have this name.
const CowNode = ".cow"

// IsSnapshot reports whether the record is a snapshot.
func (img Image) IsSnapshot() bool { return img.Origin != nil }

// HasSnapshot reports whether id is one of the image's snapshots.
func (img Image) HasSnapshot(id string) bool {
	for _, s := range img.Snapshots {
		if s.ID == id {
			return true
		}
	}
	return false
}

// HasLocation reports whether node holds a copy.
func (img *Image) HasLocation(node string) bool {
	for _, l := range img.Locations {
		if l == node {
			return true
		}
	}
	return false
}

// Blocks is the number of blocks of the image (the last may be partial).
func (img *Image) Blocks() int64 { return (img.Size + img.BlockSize - 1) / img.BlockSize }

// NodeNameRE is what a node name looks like.
var NodeNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?$`)

// ValidateName checks that name can be the last part of an iSCSI IQN.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: image name %q: use 1-64 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit (it becomes the end of an iSCSI IQN)", ErrInvalid, name)
	}
	return nil
}

// SnapshotSep joins an image's name and one of its snapshot's names into
// the snapshot's full name, as rbd writes it: vm1@s1. Snapshots are named
// per image: vm1@s1 and vm2@s1 are two snapshots.
const SnapshotSep = "@"

// SnapshotName is the full name of image's snapshot snap (the key of its
// record).
func SnapshotName(image, snap string) string { return image + SnapshotSep + snap }

// SplitSnapshotName splits a full snapshot name into the image's and the
// snapshot's; ok is false for a name without SnapshotSep.
func SplitSnapshotName(full string) (image, snap string, ok bool) {
	return strings.Cut(full, SnapshotSep)
}

// A snapshot's own name is no part of an IQN (a snapshot is not exported):
// letters of either case, digits, '.', '_' and '-', as Cinder's
// "snapshot-<uuid>" and dates like "2026-12-07T0300" need. A name starting
// with '.' is hidden: the temporary snapshot a clone of an image in use
// takes; nobody can create one by hand.
var snapNameRE = regexp.MustCompile(`^\.?[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateSnapshotName checks a snapshot name an operator chose.
func ValidateSnapshotName(snap string) error {
	if !snapNameRE.MatchString(snap) || strings.HasPrefix(snap, ".") {
		return fmt.Errorf("%w: snapshot name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, snap)
	}
	return nil
}

// HiddenSnapshot reports whether snap (the snapshot's own name) is one
// ukai took for itself (a clone's temporary snapshot).
func HiddenSnapshot(snap string) bool { return strings.HasPrefix(snap, ".") }

// ValidateRecordName checks the name of any record: an image's
// (ValidateName) or a snapshot's full name (image@snap, hidden ones too).
func ValidateRecordName(name string) error {
	image, snap, ok := SplitSnapshotName(name)
	if !ok {
		return ValidateName(name)
	}
	if ValidateName(image) != nil || !snapNameRE.MatchString(snap) {
		return fmt.Errorf("%w: snapshot %q: want IMAGE@SNAPSHOT, the snapshot named with 1-64 letters, digits, '.', '_' or '-'", ErrInvalid, name)
	}
	return nil
}

// ValidateID checks that id is an image id as NewImageID makes them:
// exactly 32 lowercase hex digits. An id names files in every node's data
// dir (images/<id>.img) and keys in the store, so nothing else is taken
// from a record, a request or a key: "../x" would be a path.
func ValidateID(id string) error {
	if len(id) != 32 {
		return fmt.Errorf("%w: image id %q: want 32 lowercase hex digits", ErrInvalid, id)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return fmt.Errorf("%w: image id %q: want 32 lowercase hex digits", ErrInvalid, id)
		}
	}
	return nil
}

// ValidateGeometry checks size and block size.
func ValidateGeometry(size, blockSize int64) error {
	if blockSize < MinBlockSize || blockSize > MaxBlockSize || blockSize&(blockSize-1) != 0 {
		return fmt.Errorf("%w: block size %s: must be a power of two from 64K to 64M", ErrInvalid, FormatSize(blockSize))
	}
	if size <= 0 {
		return fmt.Errorf("%w: size %s: must be greater than zero", ErrInvalid, FormatSize(size))
	}
	if size%SectorSize != 0 {
		return fmt.Errorf("%w: size %s: must be a multiple of %d bytes", ErrInvalid, FormatSize(size), SectorSize)
	}
	return nil
}

// Validate checks a whole record.
func (img *Image) Validate() error {
	if img.Version != RecordVersion {
		return fmt.Errorf("unknown record version %d (this ukai understands %d)", img.Version, RecordVersion)
	}
	if err := ValidateRecordName(img.Name); err != nil {
		return err
	}
	if image, _, ok := SplitSnapshotName(img.Name); ok && (img.Origin == nil || img.Origin.Name != image) {
		return fmt.Errorf("%w: record %q is not a snapshot of %q", ErrInvalid, img.Name, image)
	}
	if err := ValidateGeometry(img.Size, img.BlockSize); err != nil {
		return err
	}
	if err := ValidateID(img.ID); err != nil {
		return err
	}
	if len(img.Locations) == 0 {
		return fmt.Errorf("%w: no locations", ErrInvalid)
	}
	seen := map[string]bool{}
	for _, l := range img.Locations {
		if !NodeNameRE.MatchString(l) || seen[l] {
			return fmt.Errorf("%w: location %q is not a valid, distinct node name", ErrInvalid, l)
		}
		seen[l] = true
	}
	if img.Origin != nil {
		if err := ValidateName(img.Origin.Name); err != nil || ValidateID(img.Origin.ID) != nil {
			return fmt.Errorf("%w: malformed origin %q (id %q)", ErrInvalid, img.Origin.Name, img.Origin.ID)
		}
		if len(img.Snapshots) > 0 {
			return fmt.Errorf("%w: a snapshot has no snapshots", ErrInvalid)
		}
	}
	for _, sn := range img.Snapshots {
		if err := ValidateRecordName(sn.Name); err != nil || ValidateID(sn.ID) != nil {
			return fmt.Errorf("%w: malformed snapshot reference %q (id %q)", ErrInvalid, sn.Name, sn.ID)
		}
	}
	if img.MinCopies < 1 || img.MinCopies > len(img.Locations) {
		return fmt.Errorf("%w: min_copies %d outside 1..%d", ErrInvalid, img.MinCopies, len(img.Locations))
	}
	return img.QoS.Validate()
}

func decodeImage(data []byte) (Image, error) {
	var img Image
	if err := json.Unmarshal(data, &img); err != nil {
		return Image{}, fmt.Errorf("not a valid image record: %w", err)
	}
	if err := img.Validate(); err != nil {
		return Image{}, err
	}
	return img, nil
}

// FormatSize prints a size the way operators type it: 3M, 16P, 1536K,
// 1000 (the largest unit that divides it).
func FormatSize(n int64) string {
	units := []string{"", "K", "M", "G", "T", "P", "E"}
	i := 0
	for i < len(units)-1 && n > 0 && n%(int64(1)<<(10*(i+1))) == 0 {
		i++
	}
	return fmt.Sprintf("%d%s", n>>(10*i), units[i])
}
