package iscsi

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
)

// Export is one initiator's right to one target.
type Export struct {
	// Initiator is the IQN allowed to log in; "*" admits any initiator,
	// but only with CHAP (a "*" export without CHAPUser is ignored).
	Initiator string
	// CHAPUser and CHAPSecret are one-way CHAP: the initiator proves
	// itself. An empty CHAPUser means no CHAP for this initiator.
	CHAPUser, CHAPSecret string
	// MutualUser and MutualSecret are mutual CHAP: the target proves
	// itself to an initiator that asks for it.
	MutualUser, MutualSecret string
}

// ACL is the node's access list source (the node implements it from the
// catalog; images come and go).
type ACL interface {
	// Exports returns the exports of target (an IQN); ok=false when the
	// target has no export at all.
	Exports(target string) (exp []Export, ok bool)
}

// CHAPConfig configures NewCHAPAuthenticator.
type CHAPConfig struct {
	ACL ACL
	// RequireACL true: a target with no export admits nobody (and is
	// hidden from discovery); false: a target with no export admits
	// everyone without CHAP.
	RequireACL bool
	Logger     *slog.Logger
	// Rand is the challenge randomness (crypto/rand by default).
	Rand io.Reader
	// Discovery, when set, requires CHAP on discovery sessions with its
	// CHAPUser and CHAPSecret (any initiator name; Initiator is ignored),
	// and answers mutual CHAP with MutualUser and MutualSecret when
	// those are set. Nil: discovery sessions need no authentication.
	Discovery *Export
}

// CHAP limits (RFC 7143 12.1.3).
const (
	chapAlgMD5         = "5"
	chapChallengeLen   = 16   // bytes of our challenge
	chapMaxBinaryLen   = 1024 // longest CHAP_C / CHAP_R accepted
	chapMD5ResponseLen = md5.Size
)

// NewCHAPAuthenticator returns an Authenticator that admits initiators
// from cfg.ACL, with one-way or mutual CHAP (MD5) where the export has
// CHAP credentials. Discovery sessions need CHAP only with cfg.Discovery;
// SendTargets shows an initiator only the targets exported to it.
//
// A login the access list refuses (initiator not listed, target without
// export under RequireACL, export without a secret) is not refused at
// once: it gets a CHAP exchange that fails at its end with 02/01, exactly
// as a wrong secret does (and as the login layer answers an unknown
// target), so an initiator cannot tell which targets exist or whom they
// admit. The true reason is logged at info.
func NewCHAPAuthenticator(cfg CHAPConfig) Authenticator {
	a := &chapAuth{acl: cfg.ACL, requireACL: cfg.RequireACL, log: cfg.Logger, rnd: cfg.Rand, discovery: cfg.Discovery}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.rnd == nil {
		a.rnd = rand.Reader
	}
	return a
}

type chapAuth struct {
	acl        ACL
	requireACL bool
	log        *slog.Logger
	rndMu      sync.Mutex
	rnd        io.Reader
	discovery  *Export
}

func (a *chapAuth) exports(target string) ([]Export, bool) {
	if a.acl == nil {
		return nil, false
	}
	return a.acl.Exports(target)
}

// findExport returns the export of initiator: an exact IQN match, else a
// "*" export with CHAP.
func findExport(exps []Export, initiator string) (Export, bool) {
	for _, e := range exps {
		if e.Initiator != "*" && e.Initiator != "" && e.Initiator == initiator {
			return e, true
		}
	}
	for _, e := range exps {
		if e.Initiator == "*" && e.CHAPUser != "" {
			return e, true
		}
	}
	return Export{}, false
}

// Visible reports whether discovery shows target to initiator.
func (a *chapAuth) Visible(initiator, target string) bool {
	exps, ok := a.exports(target)
	if !ok {
		return !a.requireACL
	}
	_, found := findExport(exps, initiator)
	return found
}

// Begin starts the security stage of one login.
func (a *chapAuth) Begin(ctx context.Context, info LoginInfo) (AuthExchange, error) {
	if info.Discovery {
		if a.discovery == nil {
			return noneExchange{}, nil
		}
		return &chapExchange{a: a, info: info, exp: *a.discovery}, nil
	}
	exps, ok := a.exports(info.TargetName)
	if !ok {
		if a.requireACL {
			return a.refused(info, "target has no export"), nil
		}
		return noneExchange{}, nil
	}
	exp, found := findExport(exps, info.InitiatorName)
	if !found {
		return a.refused(info, "initiator not on the export list"), nil
	}
	if exp.CHAPUser == "" {
		return noneExchange{}, nil
	}
	if exp.CHAPSecret == "" {
		a.log.Warn("iscsi chap: export has a CHAP user but no secret", "initiator", info.InitiatorName, "target", info.TargetName)
		return a.refused(info, "export has no CHAP secret"), nil
	}
	return &chapExchange{a: a, info: info, exp: exp}, nil
}

// refused returns the exchange of a login refused for reason: CHAP with a
// random secret nobody knows, failing at its end like a wrong secret.
func (a *chapAuth) refused(info LoginInfo, reason string) AuthExchange {
	secret := make([]byte, 16)
	if err := a.random(secret); err != nil {
		secret = nil // the exchange fails anyway
	}
	return &chapExchange{a: a, info: info, refusal: reason,
		exp: Export{CHAPUser: "\x00refused", CHAPSecret: string(secret)}}
}

// RefusedExchange returns an AuthExchange for a login that must fail
// without telling the initiator why (an unknown target): it runs a CHAP
// exchange to its end and fails it with ErrAuthFailed, as a wrong secret
// does; reason is logged to log at info.
func RefusedExchange(log *slog.Logger, info LoginInfo, reason string) AuthExchange {
	a := NewCHAPAuthenticator(CHAPConfig{Logger: log}).(*chapAuth)
	return a.refused(info, reason)
}

// refuse logs a refused login and returns the error for it (never
// carrying a secret).
func (a *chapAuth) refuse(info LoginInfo, reason string, kind error) error {
	args := []any{"initiator", info.InitiatorName, "target", info.TargetName, "reason", reason}
	if info.RemoteAddr != nil {
		args = append(args, "remote", info.RemoteAddr.String())
	}
	a.log.Info("iscsi login refused", args...)
	return fmt.Errorf("chap: %s: %w", reason, kind)
}

func (a *chapAuth) random(b []byte) error {
	a.rndMu.Lock()
	defer a.rndMu.Unlock()
	_, err := io.ReadFull(a.rnd, b)
	return err
}

// noneExchange admits the initiator without authentication.
type noneExchange struct{}

func (noneExchange) Methods() []string { return []string{"None"} }
func (noneExchange) Step(method string, in []KeyValue) ([]KeyValue, bool, error) {
	return nil, false, fmt.Errorf("chap: security keys with AuthMethod %q: %w", method, ErrAuthFailed)
}

// CHAP exchange states.
const (
	chapWantAlg = iota
	chapWantResponse
	chapDone
	chapFailed
)

// chapExchange is the CHAP exchange of one login.
type chapExchange struct {
	a         *chapAuth
	info      LoginInfo
	exp       Export
	state     int
	id        byte
	challenge []byte
	// refusal, when set, is why the login is refused whatever the
	// initiator answers (see chapAuth.refused).
	refusal string
}

func (e *chapExchange) Methods() []string { return []string{"CHAP"} }

// Refusal implements the login layer's refusalReason: the true reason of
// a login refused regardless of the exchange ("" for a real exchange).
func (e *chapExchange) Refusal() string { return e.refusal }

func (e *chapExchange) fail(reason string) error {
	e.state = chapFailed
	if e.refusal != "" {
		reason = e.refusal
	}
	return e.a.refuse(e.info, reason, ErrAuthFailed)
}

// Step runs the CHAP exchange: CHAP_A from the initiator is answered with
// CHAP_A, CHAP_I and CHAP_C; CHAP_N and CHAP_R (plus CHAP_I and CHAP_C for
// mutual CHAP) are checked and, for mutual CHAP, answered with CHAP_N and
// CHAP_R.
func (e *chapExchange) Step(method string, in []KeyValue) ([]KeyValue, bool, error) {
	if method != "CHAP" {
		return nil, false, e.fail("unexpected AuthMethod")
	}
	keys := map[string]string{}
	for _, kv := range in {
		if _, dup := keys[kv.Key]; dup {
			return nil, false, e.fail("duplicate CHAP key")
		}
		keys[kv.Key] = kv.Value
	}
	switch e.state {
	case chapWantAlg:
		return e.stepAlg(keys)
	case chapWantResponse:
		return e.stepResponse(keys)
	default:
		return nil, false, e.fail("CHAP keys after the exchange ended")
	}
}

func (e *chapExchange) stepAlg(keys map[string]string) ([]KeyValue, bool, error) {
	algs, ok := keys["CHAP_A"]
	if !ok || len(keys) != 1 {
		return nil, false, e.fail("expected CHAP_A alone")
	}
	md5OK := false
	for _, alg := range strings.Split(algs, ",") {
		if alg == chapAlgMD5 {
			md5OK = true
			break
		}
	}
	if !md5OK {
		return nil, false, e.fail("no supported CHAP_A (only 5, MD5)")
	}
	buf := make([]byte, 1+chapChallengeLen)
	if err := e.a.random(buf); err != nil {
		e.state = chapFailed
		return nil, false, fmt.Errorf("chap: challenge: %v: %w", err, ErrAuthFailed)
	}
	e.id, e.challenge = buf[0], buf[1:]
	e.state = chapWantResponse
	return []KeyValue{
		{"CHAP_A", chapAlgMD5},
		{"CHAP_I", strconv.Itoa(int(e.id))},
		{"CHAP_C", encodeCHAPBinary(e.challenge)},
	}, false, nil
}

func (e *chapExchange) stepResponse(keys map[string]string) ([]KeyValue, bool, error) {
	for k := range keys {
		switch k {
		case "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C":
		default:
			return nil, false, e.fail("unexpected key in CHAP response")
		}
	}
	user, okN := keys["CHAP_N"]
	rs, okR := keys["CHAP_R"]
	if !okN || !okR {
		return nil, false, e.fail("missing CHAP_N or CHAP_R")
	}
	resp, err := decodeCHAPBinary(rs)
	if err != nil {
		return nil, false, e.fail("bad CHAP_R: " + err.Error())
	}
	want := chapResponse(e.id, []byte(e.exp.CHAPSecret), e.challenge)
	userOK := subtle.ConstantTimeCompare([]byte(user), []byte(e.exp.CHAPUser))
	respOK := subtle.ConstantTimeCompare(resp, want[:])
	if e.refusal != "" {
		return nil, false, e.fail(e.refusal)
	}
	if userOK&respOK != 1 {
		if userOK != 1 {
			return nil, false, e.fail("wrong CHAP user")
		}
		return nil, false, e.fail("wrong CHAP response")
	}
	// The initiator is authenticated. Mutual CHAP is its choice.
	is, okI := keys["CHAP_I"]
	cs, okC := keys["CHAP_C"]
	if !okI && !okC {
		e.state = chapDone
		e.a.log.Debug("iscsi chap: initiator authenticated", "initiator", e.info.InitiatorName, "target", e.info.TargetName)
		return nil, true, nil
	}
	if !okI || !okC {
		return nil, false, e.fail("mutual CHAP needs both CHAP_I and CHAP_C")
	}
	id, err := parseCHAPID(is)
	if err != nil {
		return nil, false, e.fail("bad CHAP_I: " + err.Error())
	}
	ch, err := decodeCHAPBinary(cs)
	if err != nil {
		return nil, false, e.fail("bad CHAP_C: " + err.Error())
	}
	if subtle.ConstantTimeCompare(ch, e.challenge) == 1 {
		return nil, false, e.fail("initiator challenge reflects ours")
	}
	if e.exp.MutualUser == "" || e.exp.MutualSecret == "" {
		return nil, false, e.fail("mutual CHAP requested but not configured")
	}
	if subtle.ConstantTimeCompare([]byte(e.exp.MutualSecret), []byte(e.exp.CHAPSecret)) == 1 {
		// RFC 7143 12.1.3: a secret authenticating initiators must not
		// authenticate targets.
		e.a.log.Warn("iscsi chap: mutual secret equals the initiator secret", "initiator", e.info.InitiatorName, "target", e.info.TargetName)
		return nil, false, e.fail("mutual CHAP secret equals the initiator secret")
	}
	r := chapResponse(id, []byte(e.exp.MutualSecret), ch)
	e.state = chapDone
	e.a.log.Debug("iscsi chap: mutual authentication", "initiator", e.info.InitiatorName, "target", e.info.TargetName)
	return []KeyValue{
		{"CHAP_N", e.exp.MutualUser},
		{"CHAP_R", encodeCHAPBinary(r[:])},
	}, true, nil
}

// chapResponse is the CHAP MD5 response MD5(id || secret || challenge)
// (RFC 1994).
func chapResponse(id byte, secret, challenge []byte) [md5.Size]byte {
	h := md5.New()
	h.Write([]byte{id})
	h.Write(secret)
	h.Write(challenge)
	var r [md5.Size]byte
	h.Sum(r[:0])
	return r
}

func encodeCHAPBinary(b []byte) string {
	return "0x" + hex.EncodeToString(b)
}

var errCHAPEncoding = errors.New("not a hex (0x) or base64 (0b) value")

// decodeCHAPBinary decodes an RFC 7143 binary value (0x hex or 0b
// base64) of 1 to chapMaxBinaryLen bytes.
func decodeCHAPBinary(s string) ([]byte, error) {
	if len(s) < 3 || s[0] != '0' {
		return nil, errCHAPEncoding
	}
	body := s[2:]
	var b []byte
	var err error
	switch s[1] {
	case 'x', 'X':
		if len(body) > 2*chapMaxBinaryLen {
			return nil, fmt.Errorf("longer than %d bytes", chapMaxBinaryLen)
		}
		if len(body)%2 == 1 {
			body = "0" + body // an odd digit count has an implied leading zero
		}
		b, err = hex.DecodeString(body)
	case 'b', 'B':
		if len(body) > base64.StdEncoding.EncodedLen(chapMaxBinaryLen) {
			return nil, fmt.Errorf("longer than %d bytes", chapMaxBinaryLen)
		}
		if strings.HasSuffix(body, "=") {
			b, err = base64.StdEncoding.Strict().DecodeString(body)
		} else {
			b, err = base64.RawStdEncoding.Strict().DecodeString(body)
		}
	default:
		return nil, errCHAPEncoding
	}
	if err != nil {
		return nil, errCHAPEncoding
	}
	if len(b) == 0 || len(b) > chapMaxBinaryLen {
		return nil, fmt.Errorf("length %d outside 1..%d", len(b), chapMaxBinaryLen)
	}
	return b, nil
}

// parseCHAPID parses a CHAP_I value: a decimal or 0x hex number 0..255.
func parseCHAPID(s string) (byte, error) {
	var v uint64
	var err error
	if len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		v, err = strconv.ParseUint(s[2:], 16, 8)
	} else {
		v, err = strconv.ParseUint(s, 10, 8)
	}
	if err != nil {
		return 0, errors.New("not a number 0..255")
	}
	return byte(v), nil
}
