package iscsi

import (
	"bytes"
	"slices"
	"testing"
)

func testLimits() limits {
	var cfg Config
	if err := cfg.setDefaults(); err != nil {
		panic(err)
	}
	return cfg.limits()
}

func TestParseText(t *testing.T) {
	good := []struct {
		in   string
		want []KeyValue
	}{
		{"", nil},
		{"A=1\x00", []KeyValue{{"A", "1"}}},
		{"A=1\x00B=\x00", []KeyValue{{"A", "1"}, {"B", ""}}},
		{"A=1\x00\x00\x00", []KeyValue{{"A", "1"}}}, // padding
		{"A=1", []KeyValue{{"A", "1"}}},             // no final NUL
		{"A=x=y\x00", []KeyValue{{"A", "x=y"}}},
		{"X-com.example.foo=bar\x00", []KeyValue{{"X-com.example.foo", "bar"}}},
	}
	for _, c := range good {
		got, err := parseText([]byte(c.in))
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("parseText(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
	bad := []string{
		"=1\x00",
		"A\x00",
		"A=1\x00\x00B=2\x00",
		"A B=1\x00",
		string(bytes.Repeat([]byte("K"), 64)) + "=1\x00",
		"A=" + string(bytes.Repeat([]byte("v"), maxValueLen+1)),
		string(bytes.Repeat([]byte("A=1\x00"), maxKeys+1)),
	}
	for _, in := range bad {
		if _, err := parseText([]byte(in)); err == nil {
			t.Errorf("parseText(%.40q) accepted", in)
		}
	}
	kvs := []KeyValue{{"A", "1"}, {"TargetName", "iqn.x:y"}}
	if got, _ := parseText(encodeText(kvs)); !slices.Equal(got, kvs) {
		t.Errorf("round trip = %v", got)
	}
}

func TestNegotiation(t *testing.T) {
	cases := []struct {
		key, offer, want string
		check            func(p params) bool
	}{
		{"HeaderDigest", "CRC32C,None", "CRC32C", func(p params) bool { return p.HeaderDigest }},
		{"HeaderDigest", "None,CRC32C", "None", func(p params) bool { return !p.HeaderDigest }},
		{"DataDigest", "CRC32C", "CRC32C", func(p params) bool { return p.DataDigest }},
		{"DataDigest", "MD5", valReject, func(p params) bool { return !p.DataDigest }},
		{"MaxConnections", "8", "1", nil},
		{"MaxConnections", "0", valReject, nil},
		{"InitialR2T", "No", "No", func(p params) bool { return !p.InitialR2T }},
		{"InitialR2T", "Yes", "Yes", func(p params) bool { return p.InitialR2T }},
		{"InitialR2T", "maybe", valReject, nil},
		{"ImmediateData", "Yes", "Yes", func(p params) bool { return p.ImmediateData }},
		{"ImmediateData", "No", "No", func(p params) bool { return !p.ImmediateData }},
		{"MaxRecvDataSegmentLength", "65536", "", func(p params) bool { return p.MaxXmitDataSegmentLength == 65536 }},
		{"MaxRecvDataSegmentLength", "16777215", "", func(p params) bool { return p.MaxXmitDataSegmentLength == 1<<20 }},
		{"MaxRecvDataSegmentLength", "100", valReject, nil},
		{"MaxBurstLength", "262144", "262144", func(p params) bool { return p.MaxBurstLength == 262144 }},
		{"MaxBurstLength", "16777215", "16776704", nil},
		{"FirstBurstLength", "16777215", "262144", func(p params) bool { return p.FirstBurstLength == 262144 }},
		{"FirstBurstLength", "0x1000", "4096", nil},
		{"DefaultTime2Wait", "0", "2", nil},
		{"DefaultTime2Wait", "10", "10", nil},
		{"DefaultTime2Retain", "20", "0", nil},
		{"MaxOutstandingR2T", "16", "4", nil},
		{"MaxOutstandingR2T", "1", "1", nil},
		{"DataPDUInOrder", "No", "Yes", nil},
		{"DataSequenceInOrder", "No", "Yes", nil},
		{"ErrorRecoveryLevel", "2", "0", nil},
		{"IFMarker", "Yes", "No", nil},
		{"OFMarker", "No", "No", nil},
		{"OFMarkInt", "2048~8192", valIrrelevant, nil},
		{"X-com.example.foo", "1", valNotUnderstood, nil},
		{"Bogus", "1", valNotUnderstood, nil},
		{"TaskReporting", "FastAbort", "RFC3720", nil},
		{"AuthMethod", "None", valReject, nil},
	}
	for _, c := range cases {
		n := newNegotiator(testLimits())
		out, err := n.negotiate([]KeyValue{{c.key, c.offer}}, nil)
		if err != nil {
			t.Fatalf("%s=%s: %v", c.key, c.offer, err)
		}
		got := ""
		if len(out) == 1 {
			got = out[0].Value
		} else if len(out) > 1 {
			t.Fatalf("%s=%s: %v", c.key, c.offer, out)
		}
		if got != c.want {
			t.Errorf("%s=%s -> %q, want %q", c.key, c.offer, got, c.want)
		}
		if c.check != nil && !c.check(n.p) {
			t.Errorf("%s=%s: params %+v", c.key, c.offer, n.p)
		}
	}
	// Duplicate key.
	n := newNegotiator(testLimits())
	if _, err := n.negotiate([]KeyValue{{"MaxBurstLength", "512"}, {"MaxBurstLength", "1024"}}, nil); err == nil {
		t.Error("duplicate key accepted")
	}
	// FirstBurstLength never exceeds MaxBurstLength.
	n = newNegotiator(testLimits())
	n.negotiate([]KeyValue{{"MaxBurstLength", "4096"}, {"FirstBurstLength", "65536"}}, nil)
	if n.p.FirstBurstLength != 4096 {
		t.Errorf("FirstBurstLength = %d", n.p.FirstBurstLength)
	}
	// Defaults without negotiation are RFC defaults.
	n = newNegotiator(testLimits())
	if n.p.MaxXmitDataSegmentLength != 8192 || !n.p.InitialR2T || n.p.FirstBurstLength != 65536 {
		t.Errorf("defaults %+v", n.p)
	}
}

// FuzzParseText feeds arbitrary login/text data to the key parser and the
// negotiation: no panics, bounded results.
func FuzzParseText(f *testing.F) {
	f.Add([]byte("InitiatorName=iqn.x\x00SessionType=Discovery\x00"))
	f.Add([]byte("HeaderDigest=CRC32C,None\x00MaxRecvDataSegmentLength=0x100000\x00"))
	f.Add([]byte("A=\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		kvs, err := parseText(b)
		if err != nil {
			return
		}
		if len(kvs) > maxKeys {
			t.Fatalf("%d keys", len(kvs))
		}
		n := newNegotiator(testLimits())
		out, err := n.negotiate(kvs, func(k string) bool { return loginDeclarative[k] })
		if err != nil {
			return
		}
		lim := testLimits()
		if n.p.MaxBurstLength > lim.MaxBurstLength || n.p.FirstBurstLength > n.p.MaxBurstLength ||
			n.p.MaxXmitDataSegmentLength > lim.MaxXmit || n.p.MaxOutstandingR2T > lim.MaxOutstandingR2T ||
			n.p.MaxConnections != 1 || n.p.ErrorRecoveryLevel != 0 {
			t.Fatalf("negotiated beyond limits: %+v", n.p)
		}
		if _, err := parseText(encodeText(out)); err != nil && len(encodeText(out)) <= maxTextLen {
			t.Fatalf("response does not parse: %v", err)
		}
	})
}

// TestNegotiationOmittedKeys: keys the initiator leaves out still end at
// the target's limits (RFC 7143: the lower of both sides, the initiator's
// side being the RFC default; ImmediateData ANDed), and the target
// declares the ones stricter than the RFC defaults.
func TestNegotiationOmittedKeys(t *testing.T) {
	lim := testLimits()
	lim.FirstBurstLength = 4096
	lim.MaxBurstLength = 16384
	lim.ImmediateData = false
	n := newNegotiator(lim)
	if _, err := n.negotiate([]KeyValue{{"HeaderDigest", "None"}}, nil); err != nil {
		t.Fatal(err)
	}
	if n.p.FirstBurstLength != 4096 || n.p.MaxBurstLength != 16384 || n.p.ImmediateData {
		t.Errorf("omitted keys: FirstBurstLength %d MaxBurstLength %d ImmediateData %v, want 4096 16384 false",
			n.p.FirstBurstLength, n.p.MaxBurstLength, n.p.ImmediateData)
	}
	decl := n.declare()
	want := []KeyValue{{"ImmediateData", "No"}, {"MaxBurstLength", "16384"}, {"FirstBurstLength", "4096"}}
	if !slices.Equal(decl, want) {
		t.Errorf("declared %v, want %v", decl, want)
	}
	if again := n.declare(); len(again) != 0 {
		t.Errorf("declared twice: %v", again)
	}
	// The initiator's answers are answers: no response, and an answer
	// above what we declared does not raise the limit.
	out, err := n.negotiate([]KeyValue{{"ImmediateData", "Yes"}, {"MaxBurstLength", "262144"}, {"FirstBurstLength", "2048"}}, nil)
	if err != nil || len(out) != 0 {
		t.Errorf("answers to our declarations answered: %v %v", out, err)
	}
	if n.p.FirstBurstLength != 2048 || n.p.MaxBurstLength != 16384 || n.p.ImmediateData {
		t.Errorf("after answers: %+v", n.p)
	}

	// Limits at or above the RFC defaults: nothing to declare, RFC
	// defaults in force.
	n = newNegotiator(testLimits())
	n.negotiate(nil, nil)
	if d := n.declare(); len(d) != 0 || n.p.FirstBurstLength != 65536 || n.p.MaxBurstLength != 262144 || !n.p.ImmediateData {
		t.Errorf("default limits: declared %v params %+v", d, n.p)
	}
	// A key the initiator did send is not declared again.
	n = newNegotiator(lim)
	n.negotiate([]KeyValue{{"ImmediateData", "Yes"}, {"FirstBurstLength", "1024"}}, nil)
	if d := n.declare(); !slices.Equal(d, []KeyValue{{"MaxBurstLength", "16384"}}) || n.p.FirstBurstLength != 1024 || n.p.ImmediateData {
		t.Errorf("partly offered: declared %v params %+v", d, n.p)
	}
}
