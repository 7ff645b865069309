package scsi

import (
	"context"
	"errors"
	"strconv"
	"strings"
)

// Commands that run at the device server. When several nodes serve one
// device (multipath), the data already goes to one place (the image's
// owner applies every read and write), but a LU holds state of its own:
// its reservations, and the lock that makes COMPARE AND WRITE atomic. Those
// commands must all run on one LU, the owner's, or a reservation made
// through one path would not be seen through another and two COMPARE AND
// WRITEs through two nodes could both succeed. A node that is not the
// owner hands them to Config.Remote, which runs them on the owner's LU
// with the initiator's nexus (ExecuteRemote); the owner runs them itself.
//
// Reservations also decide which reads and writes conflict. The owner
// refuses a plain read or write forwarded by another node (it comes
// without the nexus) while a reservation exists: the backend answers
// ErrRunRemotely, and the forwarding node's LU sends the whole command
// through Remote, nexus included, to be checked and run there.

// Remote runs commands at the device server (another node's LU).
type Remote interface {
	// Run runs cmd there and returns its result; ok is false when this
	// node is the device server (the LU runs the command itself).
	Run(ctx context.Context, cmd *Command) (r Result, ok bool)
	// Here says whether this node is the device server now: only then
	// does the LU's own reservation state count (a node that let go
	// keeps it, dormant, for when it takes the device back).
	Here() bool
	// Serve makes this node the device server if it can (as I/O does)
	// and says whether it is.
	Serve(ctx context.Context) bool
}

// ErrRunRemotely is a backend's answer to I/O it will only take as a whole
// command, with its nexus (a reservation exists): the LU sends the command
// through Config.Remote. Across nodes it travels as this vendor-specific
// sense (an initiator that ever saw it would retry: ABORTED COMMAND).
var ErrRunRemotely = &SenseError{Key: SenseAbortedCommand, ASC: 0x80, ASCQ: 0x01,
	Err: errors.New("a reservation exists: the command runs on the owner, with its nexus")}

// IsRunRemotely reports whether a sense is ErrRunRemotely's.
func IsRunRemotely(key, asc, ascq byte) bool {
	return key == ErrRunRemotely.Key && asc == ErrRunRemotely.ASC && ascq == ErrRunRemotely.ASCQ
}

// runsAtDeviceServer: the commands whose state is the LU's own.
func runsAtDeviceServer(info *opInfo) bool {
	switch info.op {
	case opPRIn, opPROut, opCompareAndWrite:
		return true
	}
	return false
}

// Reserved reports whether a reservation (SPC-2 or persistent) exists.
func (lu *LU) Reserved() bool { return lu.reserved.Load() }

// ExecuteRemote runs a command another node's LU handed over (Remote): on
// behalf of a nexus of that node, which keeps the nexus's unit attentions.
// Only the commands that run at the device server, and reads and writes
// (while a reservation exists), are accepted.
func (lu *LU) ExecuteRemote(ctx context.Context, cmd *Command) Result {
	cdb := cmd.CDB
	if len(cdb) == 0 || cmd.LUN != 0 {
		return invalidOpcode()
	}
	info, r, ok := lu.lookup(cdb)
	if !ok {
		return r
	}
	if isSPC2(info.op) || !runsAtDeviceServer(info) && info.class != classRead && info.class != classWrite {
		return invalidOpcode()
	}
	if lu.reserved.Load() {
		if r, conflict := lu.checkReservation(cmd.Nexus, info); conflict {
			return r
		}
	}
	r = info.run(lu, ctx, cmd)
	if r.runRemotely {
		// This LU's own backend refused: it is no longer the owner.
		return sense(SenseNotReady, ascNotReadyTransition)
	}
	return r
}

// relativePort is the relative target port of a nexus
// "<initiator>,i,0x<isid>,<target>,t,0x<port>" (1 without one).
func relativePort(id NexusID) uint16 {
	s := string(id)
	i := strings.LastIndex(s, ",t,0x")
	if i < 0 {
		return 1
	}
	v, err := strconv.ParseUint(s[i+5:], 16, 16)
	if err != nil || v == 0 {
		return 1
	}
	return uint16(v)
}

// SenseResult is a CHECK CONDITION result with the given sense.
func SenseResult(key, asc, ascq byte) Result {
	return checkCondition(senseCode{key: key, ascq: uint16(asc)<<8 | uint16(ascq)})
}

// isSPC2 reports the SPC-2 RESERVE and RELEASE commands. Their reservation
// ends with the holder's session or a LOGICAL UNIT RESET, events only the
// node with the session sees: handed to the owner, it would outlive them.
// They run only on the device server; elsewhere they are refused.
func isSPC2(op byte) bool {
	return op == opReserve6 || op == opReserve10 || op == opRelease6 || op == opRelease10
}
