package scsi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
)

// Config describes the logical unit presented to initiators. Every node
// serving the same image must use the same Serial and DeviceID so that
// multipath initiators see one device.
type Config struct {
	// Size of the LU in bytes, a multiple of LogicalBlockSize.
	Size int64
	// LogicalBlockSize is 512 (the default when 0) or 4096.
	LogicalBlockSize uint32
	// OptimalTransferBlocks is the image block size in logical blocks:
	// VPD B0 OPTIMAL TRANSFER LENGTH GRANULARITY and OPTIMAL UNMAP
	// GRANULARITY.
	OptimalTransferBlocks uint32
	// Vendor, Product and Revision of the standard INQUIRY data;
	// defaults "UKAI", "ukai-image", "0001". Printable ASCII, at most
	// 8, 16 and 4 characters.
	Vendor, Product, Revision string
	// Serial is the VPD 0x80 unit serial number (printable ASCII, at
	// most 64 characters). When empty, the hex of DeviceID is used.
	Serial string
	// DeviceID makes the VPD 0x83 designators: an NAA 6 (IEEE
	// registered extended) designator whose first nibble is forced to 6
	// and whose 124 other bits come from DeviceID, and a T10 vendor ID
	// designator (Vendor followed by the hex of DeviceID).
	DeviceID [16]byte
	// ThinProvisioning enables UNMAP and WRITE SAME with UNMAP: LBPME
	// and LBPRZ in READ CAPACITY(16), LBPU/LBPWS/LBPWS10 in VPD B2.
	ThinProvisioning bool
	// WriteCache is the WCE bit of the caching mode page. When false
	// every write goes to the Backend with fua=true.
	WriteCache bool
	// MaxUnmapBlocks is the VPD B0 MAXIMUM UNMAP LBA COUNT (per
	// descriptor); 0 means unlimited (reported as FFFFFFFFh).
	MaxUnmapBlocks uint32
	// MaxWriteSameBlocks is the VPD B0 MAXIMUM WRITE SAME LENGTH; 0
	// means no limit is reported.
	MaxWriteSameBlocks uint32
	// MaxTransferBlocks is the VPD B0 MAXIMUM TRANSFER LENGTH; 0 means
	// no limit.
	MaxTransferBlocks uint32
	// ReadOnly write-protects the LU (WP in MODE SENSE, DATA PROTECT
	// on writes).
	ReadOnly bool
	// MaxRegistrations bounds the persistent reservation registrations
	// (one per I_T nexus) the LU keeps; a REGISTER past it answers
	// INSUFFICIENT REGISTRATION RESOURCES. 0 means
	// DefaultMaxRegistrations.
	MaxRegistrations int
	// Remote, when set, runs the commands that must execute where the
	// device's state is, one node of several serving it (remote.go).
	Remote Remote
	// ALUA, when set, makes the LU one of several paths to the same
	// device: TPGS in INQUIRY, the port's designators in VPD 0x83,
	// REPORT TARGET PORT GROUPS (alua.go). Nil: a single-port LU.
	ALUA ALUA
}

// DefaultMaxRegistrations is the default bound on persistent reservation
// registrations per LU: far above the one per host path clusters use.
const DefaultMaxRegistrations = 256

// maxUnmapDescriptors is the VPD B0 MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
const maxUnmapDescriptors = 1024

// writeChunk bounds the buffer WRITE SAME and VERIFY use per Backend call.
const writeChunk = 4 << 20

// bigReadThreshold: reads larger than this are only performed up to the
// Expected Data Transfer Length, to bound memory use (the transport sends
// no more than that anyway).
const bigReadThreshold = 8 << 20

// LU is one emulated SCSI logical unit (LUN 0) over a Backend. All methods
// are safe for concurrent use.
type LU struct {
	cfg   Config
	be    Backend
	log   *slog.Logger
	bs    int64 // logical block size
	shift uint  // log2(bs)
	size  atomic.Int64

	bufs bufPool // recycled data-in buffers

	ops   []opInfo      // supported commands, in opcode order
	opIdx [256][]opInfo // by opcode

	// nexuses is a copy-on-write map: the hot path loads it without a
	// lock; AddNexus/RemoveNexus replace it under mu.
	nexuses atomic.Pointer[map[NexusID]*nexusState]

	// reserved is true when a SPC-2 or persistent reservation exists:
	// only then do commands take mu to check for conflicts.
	reserved atomic.Bool

	mu  sync.Mutex // guards nexuses writes, reservation state
	res resvState  // under mu

	caw cawLock
}

// nexusState is the per I_T nexus state: its unit attention queue.
type nexusState struct {
	hasUA atomic.Bool
	mu    sync.Mutex
	ua    []senseCode
}

const maxUAQueue = 8

func (n *nexusState) addUA(c senseCode) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, u := range n.ua {
		if u.ascq == c.ascq {
			return
		}
	}
	if len(n.ua) >= maxUAQueue {
		// Keep the oldest; SAM allows reporting a more generic one.
		n.ua[len(n.ua)-1] = c
	} else {
		n.ua = append(n.ua, c)
	}
	n.hasUA.Store(true)
}

// popUA removes and returns the oldest unit attention.
func (n *nexusState) popUA() (senseCode, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.ua) == 0 {
		n.hasUA.Store(false)
		return senseCode{}, false
	}
	c := n.ua[0]
	n.ua = append(n.ua[:0], n.ua[1:]...)
	n.hasUA.Store(len(n.ua) > 0)
	return c, true
}

func uaCode(ascq uint16) senseCode { return senseCode{key: SenseUnitAttention, ascq: ascq} }

// NewLU validates cfg and returns the logical unit serving be. log may be
// nil (logs are then discarded).
func NewLU(cfg Config, be Backend, log *slog.Logger) (*LU, error) {
	if be == nil {
		return nil, errors.New("scsi: nil backend")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.LogicalBlockSize == 0 {
		cfg.LogicalBlockSize = 512
	}
	if cfg.LogicalBlockSize != 512 && cfg.LogicalBlockSize != 4096 {
		return nil, fmt.Errorf("scsi: logical block size %d: must be 512 or 4096", cfg.LogicalBlockSize)
	}
	bs := int64(cfg.LogicalBlockSize)
	if err := checkSize(cfg.Size, bs); err != nil {
		return nil, err
	}
	if cfg.Vendor == "" {
		cfg.Vendor = "UKAI"
	}
	if cfg.Product == "" {
		cfg.Product = "ukai-image"
	}
	if cfg.Revision == "" {
		cfg.Revision = "0001"
	}
	if cfg.Serial == "" {
		cfg.Serial = fmt.Sprintf("%x", cfg.DeviceID[:])
	}
	for _, f := range []struct {
		name, v string
		max     int
	}{{"vendor", cfg.Vendor, 8}, {"product", cfg.Product, 16}, {"revision", cfg.Revision, 4}, {"serial", cfg.Serial, 64}} {
		if len(f.v) > f.max {
			return nil, fmt.Errorf("scsi: %s %q longer than %d bytes", f.name, f.v, f.max)
		}
		for i := 0; i < len(f.v); i++ {
			if f.v[i] < 0x20 || f.v[i] > 0x7e {
				return nil, fmt.Errorf("scsi: %s %q: not printable ASCII", f.name, f.v)
			}
		}
	}
	if cfg.MaxTransferBlocks != 0 && uint64(cfg.MaxTransferBlocks)*uint64(bs) > 1<<32-1 {
		return nil, fmt.Errorf("scsi: max transfer %d blocks exceeds 4 GiB", cfg.MaxTransferBlocks)
	}
	if cfg.ALUA != nil && cfg.ALUA.LocalGroup() == 0 {
		return nil, errors.New("scsi: ALUA local target port group 0 (reserved)")
	}
	if cfg.MaxRegistrations <= 0 {
		cfg.MaxRegistrations = DefaultMaxRegistrations
	}
	lu := &LU{cfg: cfg, be: be, log: log, bs: bs}
	for 1<<lu.shift != bs {
		lu.shift++
	}
	lu.size.Store(cfg.Size)
	m := map[NexusID]*nexusState{}
	lu.nexuses.Store(&m)
	lu.ops = lu.opTable()
	for _, o := range lu.ops {
		lu.opIdx[o.op] = append(lu.opIdx[o.op], o)
	}
	lu.caw.init()
	return lu, nil
}

func checkSize(size, bs int64) error {
	if size <= 0 {
		return fmt.Errorf("scsi: size %d: must be positive", size)
	}
	if size%bs != 0 {
		return fmt.Errorf("scsi: size %d not a multiple of the block size %d", size, bs)
	}
	return nil
}

// Size returns the current size of the LU in bytes.
func (lu *LU) Size() int64 { return lu.size.Load() }

func (lu *LU) numBlocks() uint64 { return uint64(lu.size.Load()) >> lu.shift }

// Resize changes the capacity online; every nexus gets a CAPACITY DATA HAS
// CHANGED unit attention. The Backend must already cover the new size.
func (lu *LU) Resize(size int64) error {
	if err := checkSize(size, lu.bs); err != nil {
		return err
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.size.Swap(size) == size {
		return nil
	}
	for _, n := range *lu.nexuses.Load() {
		n.addUA(uaCode(ascCapacityChanged))
	}
	return nil
}

// AddNexus registers a new I_T nexus: its first command (other than
// INQUIRY, REPORT LUNS, REQUEST SENSE) gets a POWER ON, RESET, OR BUS
// DEVICE RESET OCCURRED unit attention. A nexus added again (session
// reinstatement) starts afresh.
func (lu *LU) AddNexus(n NexusID) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.addNexusLocked(n)
}

func (lu *LU) addNexusLocked(n NexusID) *nexusState {
	st := &nexusState{}
	st.addUA(uaCode(ascPowerOnReset))
	old := *lu.nexuses.Load()
	m := make(map[NexusID]*nexusState, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[n] = st
	lu.nexuses.Store(&m)
	return st
}

// RemoveNexus forgets a nexus whose session is gone: its unit attentions
// are dropped and a RESERVE(6)/(10) it holds is released. Persistent
// reservation registrations survive (SPC-4).
func (lu *LU) RemoveNexus(n NexusID) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	old := *lu.nexuses.Load()
	if _, ok := old[n]; ok {
		m := make(map[NexusID]*nexusState, len(old))
		for k, v := range old {
			if k != n {
				m[k] = v
			}
		}
		lu.nexuses.Store(&m)
	}
	if lu.res.spc2Held && lu.res.spc2Holder == n {
		lu.res.spc2Held = false
		lu.updateReservedLocked()
	}
}

// Reset performs a LOGICAL UNIT RESET requested on nexus from: SPC-2
// reservations are cleared (persistent ones are kept) and every other
// nexus gets a BUS DEVICE RESET FUNCTION OCCURRED unit attention.
func (lu *LU) Reset(from NexusID) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.res.spc2Held = false
	lu.updateReservedLocked()
	for id, n := range *lu.nexuses.Load() {
		if id != from {
			n.addUA(uaCode(ascBusDeviceReset))
		}
	}
}

// nexus returns the state of n, adding it if unknown.
func (lu *LU) nexus(n NexusID) *nexusState {
	if st, ok := (*lu.nexuses.Load())[n]; ok {
		return st
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if st, ok := (*lu.nexuses.Load())[n]; ok {
		return st
	}
	return lu.addNexusLocked(n)
}

// Opcodes.
const (
	opTestUnitReady     = 0x00
	opRequestSense      = 0x03
	opRead6             = 0x08
	opWrite6            = 0x0a
	opInquiry           = 0x12
	opModeSelect6       = 0x15
	opReserve6          = 0x16
	opRelease6          = 0x17
	opModeSense6        = 0x1a
	opStartStopUnit     = 0x1b
	opPreventAllow      = 0x1e
	opReadCapacity10    = 0x25
	opRead10            = 0x28
	opWrite10           = 0x2a
	opWriteVerify10     = 0x2e
	opVerify10          = 0x2f
	opPrefetch10        = 0x34
	opSyncCache10       = 0x35
	opWriteSame10       = 0x41
	opUnmap             = 0x42
	opModeSelect10      = 0x55
	opReserve10         = 0x56
	opRelease10         = 0x57
	opModeSense10       = 0x5a
	opPRIn              = 0x5e
	opPROut             = 0x5f
	opRead16            = 0x88
	opCompareAndWrite   = 0x89
	opWrite16           = 0x8a
	opWriteVerify16     = 0x8e
	opVerify16          = 0x8f
	opPrefetch16        = 0x90
	opSyncCache16       = 0x91
	opWriteSame16       = 0x93
	opServiceActionIn16 = 0x9e
	opReportLUNs        = 0xa0
	opMaintenanceIn     = 0xa3
	opRead12            = 0xa8
	opWrite12           = 0xaa
	opWriteVerify12     = 0xae
	opVerify12          = 0xaf

	saReadCapacity16  = 0x10
	saGetLBAStatus    = 0x12
	saReportSupported = 0x0c
)

// Execute runs one command. It never panics on malformed input and is safe
// for concurrent use.
func (lu *LU) Execute(ctx context.Context, cmd *Command) Result {
	cdb := cmd.CDB
	if len(cdb) == 0 {
		return invalidOpcode()
	}
	op := cdb[0]
	if cmd.LUN != 0 {
		switch op {
		case opInquiry:
			return lu.inquiry(cmd, false)
		case opReportLUNs:
			return lu.reportLUNs(cmd)
		case opRequestSense:
			return lu.requestSense(cmd, nil, false)
		}
		return sense(SenseIllegalRequest, ascLUNotSupported)
	}
	st := lu.nexus(cmd.Nexus)
	if op != opInquiry && op != opReportLUNs {
		if st.hasUA.Load() {
			if op == opRequestSense {
				return lu.requestSense(cmd, st, true)
			}
			if ua, ok := st.popUA(); ok {
				return checkCondition(ua)
			}
		}
	}
	info, r, ok := lu.lookup(cdb)
	if !ok {
		return r
	}
	if lu.cfg.Remote != nil && runsAtDeviceServer(info) {
		if r, ok := lu.cfg.Remote.Run(ctx, cmd); ok {
			return r
		}
	}
	if lu.cfg.Remote != nil && isSPC2(info.op) && !lu.cfg.Remote.Serve(ctx) {
		// RESERVE/RELEASE only through the owner's path (remote.go).
		return invalidOpcode()
	}
	// The LU's own reservations count only while its node is the device
	// server; a node holding them dormant takes the device first (as the
	// command's I/O would), so that its first command is checked too.
	if lu.reserved.Load() && (lu.cfg.Remote == nil || lu.cfg.Remote.Here() || lu.cfg.Remote.Serve(ctx)) {
		if r, conflict := lu.checkReservation(cmd.Nexus, info); conflict {
			return r
		}
	}
	r = info.run(lu, ctx, cmd)
	if r.runRemotely && lu.cfg.Remote != nil {
		// The device server refused the I/O this node forwarded without
		// the nexus (a reservation exists there): the whole command goes
		// there, with it.
		if rr, ok := lu.cfg.Remote.Run(ctx, cmd); ok {
			return rr
		}
		return sense(SenseNotReady, ascNotReadyTransition)
	}
	if r.runRemotely {
		// No Remote to hand it to: the backend did not run it.
		return sense(SenseNotReady, ascNotReadyTransition)
	}
	r.runRemotely = false
	return r
}

// lookup finds the command descriptor for cdb and validates the CDB
// length and the bits the command does not use.
func (lu *LU) lookup(cdb []byte) (*opInfo, Result, bool) {
	cands := lu.opIdx[cdb[0]]
	if len(cands) == 0 {
		return nil, invalidOpcode(), false
	}
	info := &cands[0]
	if info.hasSA {
		if len(cdb) < 2 {
			return nil, invalidCDB(1), false
		}
		sa := uint16(cdb[1] & 0x1f)
		info = nil
		for i := range cands {
			if cands[i].sa == sa {
				info = &cands[i]
				break
			}
		}
		if info == nil {
			return nil, invalidCDB(1), false
		}
	}
	if len(cdb) < info.cdbLen {
		return nil, invalidCDB(len(cdb)), false
	}
	for i := 1; i < info.cdbLen; i++ {
		if cdb[i]&^info.usage[i] != 0 {
			return nil, invalidCDB(i), false
		}
	}
	if cdb[info.cdbLen-1]&ctl != 0 {
		// NACA (and LINK) are not supported.
		return nil, invalidCDB(info.cdbLen - 1), false
	}
	return info, Result{}, true
}
