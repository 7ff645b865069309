package iscsi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ukai-storage/ukai/target/scsi"
)

// Login stages.
const (
	stageSecurity    = 0
	stageOperational = 1
	stageFullFeature = 3
)

// Login status class and detail (RFC 7143 11.13.5).
type loginStatus uint16

const (
	statusSuccess           loginStatus = 0x0000
	statusInitiatorError    loginStatus = 0x0200
	statusAuthFailed        loginStatus = 0x0201
	statusNotAuthorized     loginStatus = 0x0202
	statusNotFound          loginStatus = 0x0203
	statusTargetRemoved     loginStatus = 0x0204
	statusUnsupportedVer    loginStatus = 0x0205
	statusTooManyConns      loginStatus = 0x0206
	statusMissingParam      loginStatus = 0x0207
	statusCantInclude       loginStatus = 0x0208
	statusSessionTypeUnsupp loginStatus = 0x0209
	statusNoSession         loginStatus = 0x020a
	statusInvalidDuringLog  loginStatus = 0x020b
	statusTargetError       loginStatus = 0x0300
	statusServiceUnavail    loginStatus = 0x0301
	statusOutOfResources    loginStatus = 0x0302
)

// loginError is a login failure answered with a status.
type loginError struct {
	status loginStatus
	msg    string
}

func (e *loginError) Error() string {
	return fmt.Sprintf("login rejected (%02x/%02x): %s", byte(e.status>>8), byte(e.status), e.msg)
}

func loginErr(st loginStatus, format string, args ...any) *loginError {
	return &loginError{st, fmt.Sprintf(format, args...)}
}

// loginState is one login in progress.
type loginState struct {
	c     *conn
	first bool

	isid   [6]byte
	tsih   uint16
	cid    uint16
	cmdSN  uint32
	statSN uint32
	stage  int

	initiatorName string
	targetName    string
	discovery     bool
	lu            *scsi.LU

	neg        *negotiator
	auth       AuthExchange
	authMethod string
	authDone   bool
	declared   bool // our MaxRecvDataSegmentLength sent
	sentTPGT   bool
	text       []byte
}

// login runs the login phase; on success c.sess is a registered session
// and the connection is in full feature phase.
func (c *conn) login() error {
	cfg := &c.srv.cfg
	c.nc.SetDeadline(time.Now().Add(cfg.LoginTimeout))
	defer c.nc.SetDeadline(time.Time{})
	ls := &loginState{c: c, first: true, neg: newNegotiator(cfg.limits())}
	for {
		p, err := c.pr.readPDU()
		if err != nil {
			return fmt.Errorf("read login PDU: %w", err)
		}
		if p.h.opcode() != opLoginReq {
			return fmt.Errorf("opcode %#x during login", p.h.opcode())
		}
		resp, done, lerr := ls.step(p)
		if lerr != nil {
			if r, ok := ls.auth.(refusalReason); ok && r.Refusal() != "" && !strings.Contains(lerr.msg, r.Refusal()) {
				// What the initiator is not told, the log says.
				lerr.msg += " (refused: " + r.Refusal() + ")"
			}
			rp := ls.response(p, nil, false, 0)
			rp.hdr[36] = byte(lerr.status >> 8)
			rp.hdr[37] = byte(lerr.status)
			rp.hdr[1] = 0
			_, werr := c.writeBatch([]*outPDU{rp}, nil)
			if werr != nil {
				return errors.Join(lerr, werr)
			}
			return lerr
		}
		if _, err := c.writeBatch([]*outPDU{resp}, nil); err != nil {
			if s := ls.c.sess; s != nil {
				c.srv.unregisterSession(s)
				s.conn.Store(nil)
				c.sess = nil
			}
			return fmt.Errorf("write login response: %w", err)
		}
		if done {
			return ls.complete()
		}
	}
}

// step handles one Login Request and builds the response.
func (ls *loginState) step(p *pdu) (*outPDU, bool, *loginError) {
	c := ls.c
	h := &p.h
	fl := h.flags()
	transit := fl&flagTransit != 0
	cont := fl&flagContinue != 0
	csg := int(fl>>2) & 3
	nsg := int(fl) & 3
	if transit && cont {
		return nil, false, loginErr(statusInitiatorError, "T and C both set")
	}
	isid := [6]byte(h[8:14])
	tsih := h.u16(14)
	cid := h.u16(20)
	if ls.first {
		if h[3] > 0 { // VersionMin
			return nil, false, loginErr(statusUnsupportedVer, "version-min %d", h[3])
		}
		ls.isid, ls.tsih, ls.cid = isid, tsih, cid
		ls.cmdSN = h.u32(offCmdSN)
		ls.statSN = h.u32(offExpStat)
		if csg != stageSecurity && csg != stageOperational {
			return nil, false, loginErr(statusInitiatorError, "initial stage %d", csg)
		}
		ls.stage = csg
	} else if isid != ls.isid || tsih != ls.tsih || cid != ls.cid {
		return nil, false, loginErr(statusInitiatorError, "ISID/TSIH/CID changed during login")
	}
	if csg != ls.stage {
		return nil, false, loginErr(statusInitiatorError, "CSG %d in stage %d", csg, ls.stage)
	}
	if len(ls.text)+len(p.data) > maxTextLen {
		return nil, false, loginErr(statusInitiatorError, "login text too long")
	}
	ls.text = append(ls.text, p.data...)
	if cont {
		// More text follows: acknowledge with an empty response.
		return ls.response(p, nil, false, 0), false, nil
	}
	kvs, err := parseText(ls.text)
	ls.text = nil
	if err != nil {
		return nil, false, loginErr(statusInitiatorError, "%v", err)
	}
	if ls.first {
		if lerr := ls.begin(kvs); lerr != nil {
			return nil, false, lerr
		}
		ls.first = false
	}

	var out []KeyValue
	if !ls.sentTPGT && !ls.discovery {
		out = append(out, KeyValue{"TargetPortalGroupTag", itoa(uint32(c.srv.cfg.PortalGroupTag))})
		ls.sentTPGT = true
	}
	var sec []KeyValue
	var authOffer *KeyValue
	for i := range kvs {
		kv := &kvs[i]
		switch {
		case kv.Key == "AuthMethod":
			authOffer = kv
		case strings.HasPrefix(kv.Key, "CHAP_") || strings.HasPrefix(kv.Key, "SRP_"):
			sec = append(sec, *kv)
		}
	}
	skip := func(k string) bool {
		return loginDeclarative[k] || k == "AuthMethod" || strings.HasPrefix(k, "CHAP_") || strings.HasPrefix(k, "SRP_")
	}

	switch ls.stage {
	case stageSecurity:
		if authOffer != nil {
			if ls.authMethod != "" {
				return nil, false, loginErr(statusInitiatorError, "AuthMethod sent twice")
			}
			m := ls.chooseAuth(authOffer.Value)
			if m == "" {
				return nil, false, loginErr(statusAuthFailed, "no acceptable AuthMethod in %q", authOffer.Value)
			}
			ls.authMethod = m
			out = append(out, KeyValue{"AuthMethod", m})
			if m == "None" {
				ls.authDone = true
			}
		}
		if len(sec) > 0 {
			if ls.authMethod == "" || ls.authMethod == "None" || ls.auth == nil {
				return nil, false, loginErr(statusInitiatorError, "security keys without an AuthMethod")
			}
			if ls.authDone {
				return nil, false, loginErr(statusInitiatorError, "security keys after authentication")
			}
			aout, done, err := ls.auth.Step(ls.authMethod, sec)
			if err != nil {
				return nil, false, authErr(err)
			}
			out = append(out, aout...)
			ls.authDone = done
		}
	default:
		if authOffer != nil || len(sec) > 0 {
			return nil, false, loginErr(statusInitiatorError, "security keys in operational stage")
		}
	}
	nout, err := ls.neg.negotiate(kvs, skip)
	if err != nil {
		return nil, false, loginErr(statusInitiatorError, "%v", err)
	}
	out = append(out, nout...)

	// Transition.
	respTransit := false
	respNSG := 0
	if transit {
		if nsg <= ls.stage || nsg == 2 {
			return nil, false, loginErr(statusInitiatorError, "bad NSG %d from stage %d", nsg, ls.stage)
		}
		ok := true
		if ls.stage == stageSecurity && !ls.authDone {
			if ls.authMethod == "" && slices.Contains(ls.methods(), "None") {
				ls.authDone = true // AuthMethod defaults to None
			} else if ls.authMethod == "" {
				return nil, false, loginErr(statusAuthFailed, "authentication required")
			} else {
				ok = false // exchange still running: stay
			}
		}
		if ok {
			respTransit, respNSG = true, nsg
		}
	}
	// Before full feature phase, the target declares the limits it holds
	// stricter than the RFC defaults for keys the initiator left out (the
	// stricter values are in force whatever the initiator answers), and
	// waits one more exchange for its answers. An initiator going from
	// the security stage straight to full feature phase is led through
	// the operational stage for that. Discovery sessions carry no data.
	if respTransit && respNSG == stageFullFeature && !ls.discovery {
		switch ls.stage {
		case stageOperational:
			if d := ls.neg.declare(); len(d) > 0 {
				out = append(out, d...)
				respTransit = false
			}
		case stageSecurity:
			if len(ls.neg.undeclared()) > 0 {
				respNSG = stageOperational
			}
		}
	}
	// Our MaxRecvDataSegmentLength is declared in the operational stage
	// only; an initiator that skips it sends at most the 8192 default.
	if !ls.declared && ls.stage == stageOperational {
		out = append(out, KeyValue{"MaxRecvDataSegmentLength", itoa(c.srv.cfg.MaxRecvDataSegmentLength)})
		ls.declared = true
	}
	resp := ls.response(p, encodeText(out), respTransit, respNSG)
	if respTransit {
		ls.stage = respNSG
	}
	if respTransit && respNSG == stageFullFeature {
		if lerr := ls.establish(); lerr != nil {
			return nil, false, lerr
		}
		resp.h().setU16(14, ls.c.sess.tsih)
		return resp, true, nil
	}
	return resp, false, nil
}

// refusalReason is an AuthExchange of a login refused whatever the
// initiator sends (RefusedExchange); Refusal is the true reason, for the
// log only.
type refusalReason interface {
	Refusal() string
}

func authErr(err error) *loginError {
	if errors.Is(err, ErrNotAuthorized) {
		return loginErr(statusNotAuthorized, "%v", err)
	}
	return loginErr(statusAuthFailed, "%v", err)
}

// begin handles the declarations of the first login request.
func (ls *loginState) begin(kvs []KeyValue) *loginError {
	c := ls.c
	get := func(k string) (string, bool) {
		for _, kv := range kvs {
			if kv.Key == k {
				return kv.Value, true
			}
		}
		return "", false
	}
	name, ok := get("InitiatorName")
	if !ok || name == "" {
		return loginErr(statusMissingParam, "no InitiatorName")
	}
	ls.initiatorName = name
	st, _ := get("SessionType")
	switch st {
	case "", "Normal":
	case "Discovery":
		ls.discovery = true
	default:
		return loginErr(statusSessionTypeUnsupp, "SessionType %q", st)
	}
	if ls.tsih != 0 {
		// Adding a connection to (or reinstating one of) an existing
		// session: MaxConnections=1 and ERL 0 allow neither.
		if c.srv.lookupSession(ls.tsih) == nil {
			return loginErr(statusNoSession, "TSIH %d", ls.tsih)
		}
		return loginErr(statusTooManyConns, "MaxConnections=1")
	}
	unknown := false
	if !ls.discovery {
		tn, ok := get("TargetName")
		if !ok || tn == "" {
			return loginErr(statusMissingParam, "no TargetName")
		}
		lu, found := c.srv.targets.LookupTarget(tn)
		if !found || lu == nil {
			if c.srv.cfg.Authenticator == nil {
				return loginErr(statusNotFound, "target %q", tn)
			}
			// With authentication on, an unknown target is answered as
			// a refused login is: it must not be told from a target
			// that exists but refuses this initiator.
			unknown = true
		}
		ls.targetName, ls.lu = tn, lu
	}
	if a := c.srv.cfg.Authenticator; a != nil {
		info := LoginInfo{
			InitiatorName: ls.initiatorName,
			ISID:          ls.isid,
			TargetName:    ls.targetName,
			Discovery:     ls.discovery,
			RemoteAddr:    c.nc.RemoteAddr(),
		}
		// Begin runs for an unknown target too (the same access list
		// lookup, the same time), its answer unused.
		ctx, cancel := context.WithTimeout(c.ctx, c.srv.cfg.LoginTimeout)
		ex, err := a.Begin(ctx, info)
		cancel()
		if unknown {
			ex, err = RefusedExchange(c.log, info, "unknown target"), nil
		}
		if err != nil {
			return authErr(err)
		}
		ls.auth = ex
	}
	if ls.stage == stageOperational && !slices.Contains(ls.methods(), "None") {
		return loginErr(statusAuthFailed, "authentication required")
	}
	return nil
}

func (ls *loginState) methods() []string {
	if ls.auth == nil {
		return []string{"None"}
	}
	return ls.auth.Methods()
}

// chooseAuth picks the first of the initiator's offers we accept.
func (ls *loginState) chooseAuth(offer string) string {
	ours := ls.methods()
	for _, m := range strings.Split(offer, ",") {
		if slices.Contains(ours, m) {
			return m
		}
	}
	return ""
}

// response builds a Login Response for request p.
func (ls *loginState) response(p *pdu, data []byte, transit bool, nsg int) *outPDU {
	o := ls.c.srv.newOut()
	h := o.h()
	h[0] = opLoginResp
	fl := byte(ls.stage&3) << 2
	if transit {
		fl |= flagTransit | byte(nsg&3)
	}
	h[1] = fl
	h[2] = 0 // version-max
	h[3] = 0 // version-active
	copy(h[8:14], p.h[8:14])
	h.setU32(offITT, p.h.itt())
	h.setU32(offStatSN, ls.statSN)
	ls.statSN++
	h.setU32(offExpCmdSN, ls.cmdSN)
	h.setU32(offMaxCmdSN, ls.cmdSN+ls.c.srv.cfg.QueueDepth-1)
	o.data = data
	o.sn = snNone
	return o
}

// establish creates and registers the session at the end of login.
func (ls *loginState) establish() *loginError {
	c := ls.c
	srv := c.srv
	s := &session{
		srv:           srv,
		isid:          ls.isid,
		initiatorName: ls.initiatorName,
		targetName:    ls.targetName,
		discovery:     ls.discovery,
		depth:         srv.cfg.QueueDepth,
		expCmdSN:      ls.cmdSN,
	}
	if !ls.discovery {
		lu, ok := srv.targets.LookupTarget(ls.targetName)
		if !ok || lu == nil {
			return loginErr(statusTargetRemoved, "target %q", ls.targetName)
		}
		s.lu = lu
		s.nexus = nexusID(ls.initiatorName, ls.isid, ls.targetName, c.srv.cfg.PortalGroupTag)
	}
	old, err := srv.registerSession(s)
	for _, o := range old {
		c.log.Info("iscsi session reinstatement: closing old session", "initiator", o.initiatorName, "tsih", o.tsih)
		o.close("session reinstated")
	}
	if len(old) > 0 {
		ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
		for _, o := range old {
			o.wait(ctx)
		}
		cancel()
	}
	if err != nil {
		return loginErr(statusOutOfResources, "%v", err)
	}
	s.conn.Store(c)
	c.sess = s
	return nil
}

// complete switches the connection to full feature phase.
func (ls *loginState) complete() error {
	c := ls.c
	s := c.sess
	c.p = ls.neg.p
	c.cid = ls.cid
	c.statSN = ls.statSN
	c.hdrDigest, c.dataDigest = c.p.HeaderDigest, c.p.DataDigest
	c.pr.hdrDigest, c.pr.dataDigest = c.p.HeaderDigest, c.p.DataDigest
	c.pr.maxData = int(c.p.MaxRecvDataSegmentLength)
	c.lastRecv.Store(time.Now().UnixNano())
	c.bytesIn.Store(c.pr.n)
	if c.closing.Load() {
		c.srv.unregisterSession(s)
		return errShutdown
	}
	if s.lu != nil {
		s.lu.AddNexus(s.nexus)
	}
	kind := "normal"
	if s.discovery {
		kind = "discovery"
	}
	c.log.Info("iscsi login", "initiator", s.initiatorName, "isid", fmt.Sprintf("%x", s.isid), "target", s.targetName,
		"session", kind, "tsih", s.tsih, "header_digest", c.p.HeaderDigest, "data_digest", c.p.DataDigest,
		"mrdsl_out", c.p.MaxXmitDataSegmentLength, "max_burst", c.p.MaxBurstLength, "first_burst", c.p.FirstBurstLength,
		"initial_r2t", c.p.InitialR2T, "immediate_data", c.p.ImmediateData)
	return nil
}

// handleText answers a Text Request (SendTargets; nothing is renegotiated
// in full feature phase).
func (c *conn) handleText(p *pdu) error {
	h := &p.h
	n := h.dataLen()
	data := make([]byte, n)
	if err := c.pr.readData(h, data); err != nil {
		return err
	}
	if !h.immediate() {
		if ok, err := c.admit(h, false); !ok || err != nil {
			return err
		}
	}
	itt := h.itt()
	ttt := h.u32(offTTT)
	fl := h.flags()
	if ttt != reservedTag {
		// Continuation of a long response (or of our text request ack).
		if ttt != c.text.ttt {
			c.reject(h, rejectInvalidPDUField)
			return nil
		}
		if len(c.text.pending) > 0 {
			c.sendText(itt, nil)
			return nil
		}
	} else {
		c.text.pending = nil
	}
	if len(c.text.buf)+len(data) > maxTextLen {
		c.text.buf = nil
		c.reject(h, rejectProtocolError)
		return nil
	}
	c.text.buf = append(c.text.buf, data...)
	if fl&flagContinue != 0 {
		// The initiator has more text: acknowledge.
		c.text.ttt = c.newTextTTT()
		c.sendTextPDU(itt, nil, false, false, c.text.ttt)
		return nil
	}
	kvs, err := parseText(c.text.buf)
	c.text.buf = nil
	if err != nil {
		c.reject(h, rejectProtocolError)
		return nil
	}
	var out []KeyValue
	for _, kv := range kvs {
		switch kv.Key {
		case "SendTargets":
			out = append(out, c.sendTargets(kv.Value)...)
		default:
			if _, known := c.srvKnownKey(kv.Key); known {
				out = append(out, KeyValue{kv.Key, valReject})
			} else {
				out = append(out, KeyValue{kv.Key, valNotUnderstood})
			}
		}
	}
	c.sendText(itt, encodeText(out))
	return nil
}

func (c *conn) srvKnownKey(k string) (string, bool) {
	n := newNegotiator(c.srv.cfg.limits())
	v, _ := n.one(k, "")
	return v, v != valNotUnderstood
}

func (c *conn) newTextTTT() uint32 {
	c.nextTTT++
	if c.nextTTT == reservedTag {
		c.nextTTT = 1
	}
	return c.nextTTT
}

// sendText sends resp (or the rest of a pending response), split to the
// initiator's MaxRecvDataSegmentLength with C bit continuation.
func (c *conn) sendText(itt uint32, resp []byte) {
	if resp != nil {
		c.text.pending = resp
	}
	data := c.text.pending
	seg := int(c.p.MaxXmitDataSegmentLength)
	if len(data) <= seg {
		c.text.pending = nil
		c.sendTextPDU(itt, data, true, false, reservedTag)
		return
	}
	c.text.pending = data[seg:]
	c.text.ttt = c.newTextTTT()
	c.sendTextPDU(itt, data[:seg], false, true, c.text.ttt)
}

func (c *conn) sendTextPDU(itt uint32, data []byte, final, cont bool, ttt uint32) {
	o := c.srv.newOut()
	h := o.h()
	h[0] = opTextResp
	if final {
		h[1] |= flagFinal
	}
	if cont {
		h[1] |= flagContinue
	}
	h.setU32(offITT, itt)
	h.setU32(offTTT, ttt)
	o.data = data
	o.sn = snAdvance
	c.enqueue(o)
}

// sendTargets answers SendTargets=val.
func (c *conn) sendTargets(val string) []KeyValue {
	s := c.sess
	var names []string
	switch {
	case val == "All" && s.discovery:
		names = c.srv.targets.TargetNames()
	case val == "All" || val == "":
		if s.targetName != "" {
			names = []string{s.targetName}
		}
	default:
		if _, ok := c.srv.targets.LookupTarget(val); ok {
			names = []string{val}
		}
	}
	slices.Sort(names)
	addr := c.srv.targetAddress(c.nc.LocalAddr())
	visible := names[:0]
	for _, n := range names {
		if a := c.srv.cfg.Authenticator; a != nil && !a.Visible(s.initiatorName, n) {
			continue
		}
		visible = append(visible, n)
	}
	var portals map[string][]string
	if pl, ok := c.srv.targets.(PortalLister); ok && len(visible) > 0 {
		portals = pl.TargetPortals(visible)
	}
	var out []KeyValue
	for _, n := range visible {
		out = append(out, KeyValue{"TargetName", n})
		addrs := portals[n]
		if len(addrs) == 0 {
			addrs = []string{addr}
		}
		for _, a := range addrs {
			out = append(out, KeyValue{"TargetAddress", a})
		}
	}
	return out
}
