package iscsi

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/ukai-storage/ukai/target/scsi"
)

// LoginInfo describes a login attempt to an Authenticator.
type LoginInfo struct {
	InitiatorName string
	ISID          [6]byte
	// TargetName is empty for discovery sessions.
	TargetName string
	Discovery  bool
	RemoteAddr net.Addr
}

// Authenticator decides who may log in and what discovery shows. It is
// the seam for CHAP (one-way and mutual) and initiator ACLs.
type Authenticator interface {
	// Begin starts the security stage of one login. Returning an error
	// wrapping ErrNotAuthorized refuses the login (status 02/02); any
	// other error is an authentication failure (02/01).
	Begin(ctx context.Context, info LoginInfo) (AuthExchange, error)
	// Visible reports whether SendTargets shows target to initiator.
	Visible(initiatorName, target string) bool
}

// AuthExchange is the security stage of one login.
type AuthExchange interface {
	// Methods lists the acceptable AuthMethod values in preference order,
	// e.g. {"CHAP"} or {"CHAP", "None"}. The first of the initiator's
	// offers found here is chosen. "None" needs no Step.
	Methods() []string
	// Step receives the security keys (other than AuthMethod) of each
	// security-stage login request once a method is chosen, and returns
	// the keys to answer (e.g. CHAP_A, CHAP_I, CHAP_C; for mutual CHAP,
	// CHAP_N and CHAP_R). done reports that the initiator is
	// authenticated; the target transits out of the security stage only
	// then. An error fails the login (02/01, or 02/02 if it wraps
	// ErrNotAuthorized).
	Step(method string, in []KeyValue) (out []KeyValue, done bool, err error)
}

// Login failure reasons an Authenticator returns.
var (
	ErrAuthFailed    = errors.New("iscsi: authentication failed")
	ErrNotAuthorized = errors.New("iscsi: not authorized")
)

// session is one iSCSI session; with MaxConnections=1 it has exactly one
// connection.
type session struct {
	srv           *Server
	tsih          uint16
	isid          [6]byte
	initiatorName string
	targetName    string
	discovery     bool
	lu            *scsi.LU
	nexus         scsi.NexusID
	depth         uint32

	mu       sync.Mutex
	expCmdSN uint32
	active   uint32 // SCSI commands accepted and not yet answered

	conn     atomic.Pointer[conn]
	commands atomic.Uint64
	// writeHeld is the bytes of write buffers the session holds,
	// bounded by Config.SessionWriteBuffer.
	writeHeld atomic.Int64
}

// nexusID names the I_T nexus: the initiator port (name and ISID) and the
// target port (target name and portal group tag: the node, when several
// serve the target).
func nexusID(initiator string, isid [6]byte, target string, tpgt uint16) scsi.NexusID {
	return scsi.NexusID(fmt.Sprintf("%s,i,0x%s,%s,t,0x%04x", initiator, hex.EncodeToString(isid[:]), target, tpgt))
}

// window returns ExpCmdSN and MaxCmdSN.
func (s *session) window() (exp, max uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.expCmdSN, s.expCmdSN + s.depth - 1 - s.active
}

// cmdSNVerdict is what to do with a non-immediate PDU's CmdSN.
type cmdSNVerdict int

const (
	cmdSNAccept cmdSNVerdict = iota
	cmdSNDrop                // outside the window: silently ignored
	cmdSNGap                 // inside the window but not the next: lost PDU
)

// checkCmdSN admits a PDU by CmdSN. For non-immediate PDUs the expected
// CmdSN advances; isCmd counts a SCSI command against the window until
// done() releases it.
func (s *session) checkCmdSN(cmdSN uint32, immediate, isCmd bool) cmdSNVerdict {
	s.mu.Lock()
	defer s.mu.Unlock()
	if immediate {
		// Immediate PDUs neither advance CmdSN nor take a window slot
		// (MaxCmdSN never moves backwards).
		return cmdSNAccept
	}
	max := s.expCmdSN + s.depth - 1 - s.active
	if !inWindow(cmdSN, s.expCmdSN, max) {
		return cmdSNDrop
	}
	if cmdSN != s.expCmdSN {
		return cmdSNGap
	}
	s.expCmdSN++
	if isCmd {
		s.active++
	}
	return cmdSNAccept
}

// done releases a SCSI command's window slot.
func (s *session) done() {
	s.mu.Lock()
	if s.active > 0 {
		s.active--
	}
	s.mu.Unlock()
}

func (s *session) info() SessionInfo {
	si := SessionInfo{
		InitiatorName: s.initiatorName,
		ISID:          hex.EncodeToString(s.isid[:]),
		TSIH:          s.tsih,
		Target:        s.targetName,
		Discovery:     s.discovery,
		Commands:      s.commands.Load(),
	}
	if c := s.conn.Load(); c != nil {
		si.RemoteAddr = c.nc.RemoteAddr().String()
		si.BytesIn = c.bytesIn.Load()
		si.BytesOut = c.bytesOut.Load()
	}
	return si
}

// close ends the session (its connection).
func (s *session) close(reason string) {
	if c := s.conn.Load(); c != nil {
		c.abort(reason)
	}
}

// wait blocks until the session's connection has fully ended or ctx is done.
func (s *session) wait(ctx context.Context) {
	if c := s.conn.Load(); c != nil {
		select {
		case <-c.ended:
		case <-ctx.Done():
		}
	}
}
