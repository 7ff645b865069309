package iscsi

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// KeyValue is one iSCSI text key=value pair.
type KeyValue struct {
	Key, Value string
}

const (
	maxKeyLen = 63
	// maxValueLen bounds one value; RFC 7143 allows 255 for most keys and
	// 8192 for a few (CHAP challenges, SendTargets lists).
	maxValueLen = 8192
	// maxTextLen bounds a whole (possibly continued) text request.
	maxTextLen = 64 << 10
	maxKeys    = 256
)

// Special values (RFC 7143 6.2).
const (
	valNotUnderstood = "NotUnderstood"
	valReject        = "Reject"
	valIrrelevant    = "Irrelevant"
)

var errText = errors.New("malformed text data")

// parseText splits a text data segment into key=value pairs. Pairs are
// NUL-terminated; trailing NULs (padding) are ignored, and a missing final
// NUL is tolerated.
func parseText(data []byte) ([]KeyValue, error) {
	if len(data) > maxTextLen {
		return nil, fmt.Errorf("%w: %d bytes", errText, len(data))
	}
	var kvs []KeyValue
	for len(data) > 0 {
		i := bytes.IndexByte(data, 0)
		var item []byte
		if i < 0 {
			item, data = data, nil
		} else {
			item, data = data[:i], data[i+1:]
		}
		if len(item) == 0 {
			// Only padding NULs may follow.
			if len(bytes.Trim(data, "\x00")) != 0 {
				return nil, fmt.Errorf("%w: empty pair", errText)
			}
			break
		}
		eq := bytes.IndexByte(item, '=')
		if eq <= 0 {
			return nil, fmt.Errorf("%w: no key in %q", errText, truncate(item))
		}
		key, val := item[:eq], item[eq+1:]
		if len(key) > maxKeyLen || !validKey(key) {
			return nil, fmt.Errorf("%w: bad key %q", errText, truncate(key))
		}
		if len(val) > maxValueLen {
			return nil, fmt.Errorf("%w: value of %s too long", errText, key)
		}
		if len(kvs) >= maxKeys {
			return nil, fmt.Errorf("%w: too many keys", errText)
		}
		kvs = append(kvs, KeyValue{string(key), string(val)})
	}
	return kvs, nil
}

func validKey(k []byte) bool {
	for _, c := range k {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '.', c == '-', c == '+', c == '@', c == '_', c == '#':
		default:
			return false
		}
	}
	return true
}

func truncate(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

// encodeText joins pairs as key=value\0...
func encodeText(kvs []KeyValue) []byte {
	var b []byte
	for _, kv := range kvs {
		b = append(b, kv.Key...)
		b = append(b, '=')
		b = append(b, kv.Value...)
		b = append(b, 0)
	}
	return b
}

// params are the operational parameters of a session/connection.
type params struct {
	HeaderDigest, DataDigest bool
	// MaxRecvDataSegmentLength is what we accept (declared by the target).
	MaxRecvDataSegmentLength uint32
	// MaxXmitDataSegmentLength is what the initiator accepts (declared by
	// the initiator): the bound on the data segments we send.
	MaxXmitDataSegmentLength uint32
	MaxBurstLength           uint32
	FirstBurstLength         uint32
	InitialR2T               bool
	ImmediateData            bool
	MaxOutstandingR2T        uint32
	DataPDUInOrder           bool
	DataSequenceInOrder      bool
	ErrorRecoveryLevel       uint32
	MaxConnections           uint32
	DefaultTime2Wait         uint32
	DefaultTime2Retain       uint32
}

// rfcDefaults are the values in force for keys never negotiated.
func rfcDefaults(ourMRDSL uint32) params {
	return params{
		MaxRecvDataSegmentLength: ourMRDSL,
		MaxXmitDataSegmentLength: 8192,
		MaxBurstLength:           262144,
		FirstBurstLength:         65536,
		InitialR2T:               true,
		ImmediateData:            true,
		MaxOutstandingR2T:        1,
		DataPDUInOrder:           true,
		DataSequenceInOrder:      true,
		ErrorRecoveryLevel:       0,
		MaxConnections:           1,
		DefaultTime2Wait:         2,
		DefaultTime2Retain:       20,
	}
}

// limits are the target's side of the negotiation.
type limits struct {
	MaxRecvDataSegmentLength uint32
	MaxBurstLength           uint32
	FirstBurstLength         uint32
	InitialR2T               bool
	ImmediateData            bool
	MaxOutstandingR2T        uint32
	// maxXmit caps the data segments we send whatever the initiator
	// declares (bounds our own buffers).
	MaxXmit uint32
}

// negotiator runs the operational negotiation of one login.
type negotiator struct {
	lim  limits
	p    params
	seen map[string]bool
	// declared are the keys the target offered itself (declare): the
	// initiator's values for them are answers, not offers.
	declared map[string]bool
}

// newNegotiator starts with the values in force for keys the initiator
// never sends: each is the outcome of negotiating the target's limit
// against the RFC default (RFC 7143 13: the lower value of MaxBurstLength
// and FirstBurstLength, ImmediateData ANDed, InitialR2T ORed), not the RFC
// default alone, so a target stricter than the defaults stays so.
func newNegotiator(lim limits) *negotiator {
	p := rfcDefaults(lim.MaxRecvDataSegmentLength)
	p.MaxBurstLength = min(p.MaxBurstLength, lim.MaxBurstLength)
	p.FirstBurstLength = min(p.FirstBurstLength, lim.FirstBurstLength, p.MaxBurstLength)
	p.ImmediateData = p.ImmediateData && lim.ImmediateData
	p.InitialR2T = p.InitialR2T || lim.InitialR2T
	p.MaxOutstandingR2T = min(p.MaxOutstandingR2T, lim.MaxOutstandingR2T)
	return &negotiator{lim: lim, p: p, seen: map[string]bool{}, declared: map[string]bool{}}
}

// rfcDefaultKeys are the keys whose RFC default the target may be stricter
// than, in the order declare offers them.
var rfcDefaultKeys = []string{"ImmediateData", "MaxBurstLength", "FirstBurstLength"}

// undeclared returns the keys the initiator has not sent (nor had
// declared to it) for which the target's own limit is stricter than the
// RFC default, with the value in force. (A FirstBurstLength lowered only
// by a negotiated MaxBurstLength needs no declaration: both sides know.)
func (n *negotiator) undeclared() []KeyValue {
	def := rfcDefaults(0)
	var out []KeyValue
	for _, k := range rfcDefaultKeys {
		if n.seen[k] || n.declared[k] {
			continue
		}
		switch k {
		case "ImmediateData":
			if !n.lim.ImmediateData && def.ImmediateData {
				out = append(out, KeyValue{k, yesNo(n.p.ImmediateData)})
			}
		case "MaxBurstLength":
			if n.lim.MaxBurstLength < def.MaxBurstLength {
				out = append(out, KeyValue{k, itoa(n.p.MaxBurstLength)})
			}
		case "FirstBurstLength":
			if n.lim.FirstBurstLength < def.FirstBurstLength {
				out = append(out, KeyValue{k, itoa(n.p.FirstBurstLength)})
			}
		}
	}
	return out
}

// declare returns the keys undeclared reports and marks them offered: the
// target sends them so the initiator knows the limits in force; the
// initiator's next values for them are answers.
func (n *negotiator) declare() []KeyValue {
	out := n.undeclared()
	for _, kv := range out {
		n.declared[kv.Key] = true
	}
	return out
}

// Keys the login layer consumes itself (declarative, no response).
var loginDeclarative = map[string]bool{
	"InitiatorName":  true,
	"InitiatorAlias": true,
	"TargetName":     true,
	"SessionType":    true,
}

// errNegotiation is a fatal negotiation error (login reject 02/00).
var errNegotiation = errors.New("negotiation error")

// negotiate answers the operational keys in kvs, skipping the ones the
// caller handles (declaratives, security keys). It returns the response
// pairs. A key offered twice in one login is an error.
func (n *negotiator) negotiate(kvs []KeyValue, skip func(key string) bool) ([]KeyValue, error) {
	var out []KeyValue
	for _, kv := range kvs {
		if skip != nil && skip(kv.Key) {
			continue
		}
		if n.seen[kv.Key] {
			return nil, fmt.Errorf("%w: key %s sent twice", errNegotiation, kv.Key)
		}
		n.seen[kv.Key] = true
		if kv.Value == valNotUnderstood || kv.Value == valReject || kv.Value == valIrrelevant {
			continue // an answer to something we never offered
		}
		v, ok := n.one(kv.Key, kv.Value)
		if ok && !n.declared[kv.Key] {
			out = append(out, KeyValue{kv.Key, v})
		}
	}
	if n.p.FirstBurstLength > n.p.MaxBurstLength {
		n.p.FirstBurstLength = n.p.MaxBurstLength
	}
	return out, nil
}

// one negotiates a single key; ok=false means no response is due.
func (n *negotiator) one(key, val string) (string, bool) {
	p := &n.p
	switch key {
	case "HeaderDigest", "DataDigest":
		choice := ""
		for _, v := range strings.Split(val, ",") {
			if v == "None" || v == "CRC32C" {
				choice = v
				break
			}
		}
		if choice == "" {
			return valReject, true
		}
		if key == "HeaderDigest" {
			p.HeaderDigest = choice == "CRC32C"
		} else {
			p.DataDigest = choice == "CRC32C"
		}
		return choice, true
	case "MaxConnections":
		v, ok := numRange(val, 1, 65535)
		if !ok {
			return valReject, true
		}
		p.MaxConnections = min(v, 1)
		return itoa(p.MaxConnections), true
	case "InitialR2T":
		b, ok := parseBool(val)
		if !ok {
			return valReject, true
		}
		p.InitialR2T = b || n.lim.InitialR2T
		return yesNo(p.InitialR2T), true
	case "ImmediateData":
		b, ok := parseBool(val)
		if !ok {
			return valReject, true
		}
		p.ImmediateData = b && n.lim.ImmediateData
		return yesNo(p.ImmediateData), true
	case "MaxRecvDataSegmentLength":
		v, ok := numRange(val, 512, 1<<24-1)
		if !ok {
			return valReject, true
		}
		p.MaxXmitDataSegmentLength = min(v, n.lim.MaxXmit)
		return "", false // declarative: ours is declared separately
	case "MaxBurstLength":
		v, ok := numRange(val, 512, 1<<24-1)
		if !ok {
			return valReject, true
		}
		p.MaxBurstLength = min(v, n.lim.MaxBurstLength)
		return itoa(p.MaxBurstLength), true
	case "FirstBurstLength":
		v, ok := numRange(val, 512, 1<<24-1)
		if !ok {
			return valReject, true
		}
		p.FirstBurstLength = min(v, n.lim.FirstBurstLength)
		return itoa(p.FirstBurstLength), true
	case "DefaultTime2Wait":
		v, ok := numRange(val, 0, 3600)
		if !ok {
			return valReject, true
		}
		p.DefaultTime2Wait = max(v, 2)
		return itoa(p.DefaultTime2Wait), true
	case "DefaultTime2Retain":
		v, ok := numRange(val, 0, 3600)
		if !ok {
			return valReject, true
		}
		p.DefaultTime2Retain = min(v, 0) // ERL 0: nothing is retained
		return itoa(p.DefaultTime2Retain), true
	case "MaxOutstandingR2T":
		v, ok := numRange(val, 1, 65535)
		if !ok {
			return valReject, true
		}
		p.MaxOutstandingR2T = min(v, n.lim.MaxOutstandingR2T)
		return itoa(p.MaxOutstandingR2T), true
	case "DataPDUInOrder", "DataSequenceInOrder":
		if _, ok := parseBool(val); !ok {
			return valReject, true
		}
		// OR with our Yes: always Yes.
		return "Yes", true
	case "ErrorRecoveryLevel":
		if _, ok := numRange(val, 0, 2); !ok {
			return valReject, true
		}
		p.ErrorRecoveryLevel = 0
		return "0", true
	case "IFMarker", "OFMarker":
		if _, ok := parseBool(val); !ok {
			return valReject, true
		}
		return "No", true
	case "IFMarkInt", "OFMarkInt":
		return valIrrelevant, true
	case "TaskReporting":
		return "RFC3720", true
	case "iSCSIProtocolLevel":
		v, ok := numRange(val, 0, 31)
		if !ok {
			return valReject, true
		}
		return itoa(min(v, 1)), true
	case "TargetAlias", "TargetAddress", "TargetPortalGroupTag":
		// Target-declared keys the initiator must not send.
		return valIrrelevant, true
	case "AuthMethod":
		// Outside the security stage.
		return valReject, true
	case "SendTargets":
		return valIrrelevant, true
	}
	return valNotUnderstood, true
}

func numRange(s string, lo, hi uint32) (uint32, bool) {
	if s == "" || len(s) > 10 {
		return 0, false
	}
	var v uint64
	var err error
	switch {
	case strings.HasPrefix(s, "0x") || strings.HasPrefix(s, "0X"):
		v, err = strconv.ParseUint(s[2:], 16, 32)
	default:
		v, err = strconv.ParseUint(s, 10, 32)
	}
	if err != nil || v < uint64(lo) || v > uint64(hi) {
		return 0, false
	}
	return uint32(v), true
}

func parseBool(s string) (bool, bool) {
	switch s {
	case "Yes":
		return true, true
	case "No":
		return false, true
	}
	return false, false
}

func yesNo(b bool) string {
	if b {
		return "Yes"
	}
	return "No"
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }
