package iscsi

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// staticACL is an ACL from a fixed map.
type staticACL map[string][]Export

func (a staticACL) Exports(target string) ([]Export, bool) {
	e, ok := a[target]
	return e, ok
}

// seqReader is deterministic "randomness": 0, 1, 2, ...
type seqReader struct {
	mu sync.Mutex
	n  byte
}

func (r *seqReader) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range p {
		p[i] = r.n
		r.n++
	}
	return len(p), nil
}

// logBuf collects log output to check that no secret leaks.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestCHAPResponseVector(t *testing.T) {
	challenge := make([]byte, 16)
	for i := range challenge {
		challenge[i] = byte(i)
	}
	got := chapResponse(0x2a, []byte("chapsecret123"), challenge)
	// Computed with Python: hashlib.md5(bytes([0x2a]) + b"chapsecret123" + bytes(range(16))).
	const want = "3a3993e65aeb2d199cb65dd1d04e0b8e"
	if hex.EncodeToString(got[:]) != want {
		t.Errorf("chapResponse = %x, want %s", got, want)
	}
	// And independently with crypto/md5 over the concatenation.
	cat := append(append([]byte{0x2a}, "chapsecret123"...), challenge...)
	if sum := md5.Sum(cat); sum != got {
		t.Errorf("chapResponse = %x, md5 of concatenation %x", got, sum)
	}
}

func TestCHAPEncodings(t *testing.T) {
	b1024 := bytes.Repeat([]byte{0xa5}, 1024)
	b1025 := bytes.Repeat([]byte{0xa5}, 1025)
	cases := []struct {
		in   string
		want []byte // nil: error
	}{
		{"0x00ff10", []byte{0, 0xff, 0x10}},
		{"0XABcd", []byte{0xab, 0xcd}},
		{"0xabc", []byte{0x0a, 0xbc}}, // odd digit count
		{"0b" + base64.StdEncoding.EncodeToString([]byte("hello")), []byte("hello")},
		{"0B" + base64.RawStdEncoding.EncodeToString([]byte("hello")), []byte("hello")},
		{"0x" + hex.EncodeToString(b1024), b1024},
		{"0b" + base64.StdEncoding.EncodeToString(b1024), b1024},
		{"0x" + hex.EncodeToString(b1025), nil},
		{"0b" + base64.StdEncoding.EncodeToString(b1025), nil},
		{"0x", nil},
		{"0b", nil},
		{"", nil},
		{"1234", nil},
		{"0xzz", nil},
		{"0x 12", nil},
		{"0b!!!!", nil},
		{"0y1234", nil},
		{"0b" + strings.Repeat("A", 5000), nil},
	}
	for _, c := range cases {
		got, err := decodeCHAPBinary(c.in)
		name := c.in
		if len(name) > 20 {
			name = name[:20] + "..."
		}
		if c.want == nil {
			if err == nil {
				t.Errorf("decode %q: no error, got %d bytes", name, len(got))
			}
			continue
		}
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("decode %q = %x, %v", name, got, err)
		}
	}
	if s := encodeCHAPBinary([]byte{1, 0xfe}); s != "0x01fe" {
		t.Errorf("encode = %q", s)
	}
	for in, want := range map[string]int{"0": 0, "255": 255, "0x1f": 31, "0XfF": 255} {
		if v, err := parseCHAPID(in); err != nil || int(v) != want {
			t.Errorf("parseCHAPID(%q) = %d, %v", in, v, err)
		}
	}
	for _, in := range []string{"", "256", "-1", "+1", "0x", "0x100", "1_0", "a", "0b1"} {
		if v, err := parseCHAPID(in); err == nil {
			t.Errorf("parseCHAPID(%q) = %d, want error", in, v)
		}
	}
}

const (
	chapTarget    = iqnPrefix + ":disk1"
	chapInitiator = "iqn.2024-01.test:client1"
	chapUser      = "user1"
	chapSecret    = "initiatorsecret1"
	chapMUser     = "target1"
	chapMSecret   = "targetsecret1"
)

func testCHAPAuth(t testing.TB, acl staticACL, require bool) (Authenticator, *logBuf) {
	lb := &logBuf{}
	a := NewCHAPAuthenticator(CHAPConfig{
		ACL:        acl,
		RequireACL: require,
		Logger:     slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Rand:       &seqReader{},
	})
	return a, lb
}

func kvMap(kvs []KeyValue) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return m
}

// chapChallenge runs Begin and the CHAP_A step and returns the exchange,
// the identifier and the challenge.
func chapChallenge(t *testing.T, a Authenticator, initiator, target string) (AuthExchange, byte, []byte) {
	t.Helper()
	ex, err := a.Begin(context.Background(), LoginInfo{InitiatorName: initiator, TargetName: target})
	if err != nil {
		t.Fatalf("Begin: %v", err)
	}
	if m := ex.Methods(); !slices.Equal(m, []string{"CHAP"}) {
		t.Fatalf("Methods = %v", m)
	}
	out, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_A", "7,5"}})
	if err != nil || done {
		t.Fatalf("CHAP_A step: %v %v", done, err)
	}
	m := kvMap(out)
	if m["CHAP_A"] != "5" {
		t.Fatalf("CHAP_A answer %v", out)
	}
	id, err := strconv.Atoi(m["CHAP_I"])
	if err != nil || id < 0 || id > 255 {
		t.Fatalf("CHAP_I %q", m["CHAP_I"])
	}
	if !strings.HasPrefix(m["CHAP_C"], "0x") {
		t.Fatalf("CHAP_C %q", m["CHAP_C"])
	}
	c, err := hex.DecodeString(m["CHAP_C"][2:])
	if err != nil || len(c) < 16 {
		t.Fatalf("CHAP_C %q: %v", m["CHAP_C"], err)
	}
	return ex, byte(id), c
}

func chapR(id byte, secret string, c []byte) string {
	r := chapResponse(id, []byte(secret), c)
	return "0x" + hex.EncodeToString(r[:])
}

func TestCHAPExchange(t *testing.T) {
	acl := staticACL{
		chapTarget: {
			{Initiator: chapInitiator, CHAPUser: chapUser, CHAPSecret: chapSecret, MutualUser: chapMUser, MutualSecret: chapMSecret},
			{Initiator: "iqn.2024-01.test:oneway", CHAPUser: "ow", CHAPSecret: "onewaysecret1"},
			{Initiator: "iqn.2024-01.test:nochap"},
			{Initiator: "iqn.2024-01.test:samesecret", CHAPUser: "ss", CHAPSecret: "samesecret12", MutualUser: "t", MutualSecret: "samesecret12"},
			{Initiator: "iqn.2024-01.test:nosecret", CHAPUser: "ns"},
			{Initiator: "*"}, // no CHAP: ignored
		},
		iqnPrefix + ":star":  {{Initiator: "*", CHAPUser: "any", CHAPSecret: "anysecret123"}},
		iqnPrefix + ":empty": {},
	}
	a, lb := testCHAPAuth(t, acl, true)

	t.Run("one-way", func(t *testing.T) {
		ex, id, c := chapChallenge(t, a, chapInitiator, chapTarget)
		out, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}})
		if err != nil || !done || len(out) != 0 {
			t.Fatalf("response step: %v %v %v", out, done, err)
		}
		// Nothing more is accepted.
		if _, _, err := ex.Step("CHAP", []KeyValue{{"CHAP_A", "5"}}); !errors.Is(err, ErrAuthFailed) {
			t.Errorf("step after done: %v", err)
		}
	})
	t.Run("base64 response", func(t *testing.T) {
		ex, id, c := chapChallenge(t, a, chapInitiator, chapTarget)
		r := chapResponse(id, []byte(chapSecret), c)
		if _, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", "0b" + base64.StdEncoding.EncodeToString(r[:])}}); err != nil || !done {
			t.Fatalf("base64 response: %v %v", done, err)
		}
	})
	t.Run("mutual", func(t *testing.T) {
		ex, id, c := chapChallenge(t, a, chapInitiator, chapTarget)
		ic := []byte("initiator challenge 0123456789ab")
		out, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "77"}, {"CHAP_C", "0x" + hex.EncodeToString(ic)}})
		if err != nil || !done {
			t.Fatalf("mutual step: %v %v", done, err)
		}
		m := kvMap(out)
		if m["CHAP_N"] != chapMUser || m["CHAP_R"] != chapR(77, chapMSecret, ic) {
			t.Errorf("mutual answer %v, want CHAP_R %s", out, chapR(77, chapMSecret, ic))
		}
	})
	t.Run("mutual with hex id and base64 challenge", func(t *testing.T) {
		ex, id, c := chapChallenge(t, a, chapInitiator, chapTarget)
		ic := []byte{9, 8, 7, 6, 5, 4, 3, 2, 1}
		out, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "0xff"}, {"CHAP_C", "0b" + base64.StdEncoding.EncodeToString(ic)}})
		if err != nil || !done || kvMap(out)["CHAP_R"] != chapR(255, chapMSecret, ic) {
			t.Fatalf("mutual step: %v %v %v", out, done, err)
		}
	})
	t.Run("star export", func(t *testing.T) {
		ex, id, c := chapChallenge(t, a, "iqn.anyone", iqnPrefix+":star")
		if _, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", "any"}, {"CHAP_R", chapR(id, "anysecret123", c)}}); err != nil || !done {
			t.Fatalf("star: %v %v", done, err)
		}
	})

	fails := []struct {
		name      string
		initiator string
		keys      func(id byte, c []byte) []KeyValue
	}{
		{"wrong secret", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, "wrongsecret", c)}}
		}},
		{"wrong user", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", "user2"}, {"CHAP_R", chapR(id, chapSecret, c)}}
		}},
		{"user prefix", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", "user"}, {"CHAP_R", chapR(id, chapSecret, c)}}
		}},
		{"wrong id", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id+1, chapSecret, c)}}
		}},
		{"truncated response", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)[:20]}}
		}},
		{"response with extra byte", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c) + "00"}}
		}},
		{"missing CHAP_R", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}}
		}},
		{"missing CHAP_N", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_R", chapR(id, chapSecret, c)}}
		}},
		{"unknown key", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_X", "1"}}
		}},
		{"duplicate key", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_N", chapUser}}
		}},
		{"reflection", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "1"}, {"CHAP_C", "0x" + hex.EncodeToString(c)}}
		}},
		{"reflection in base64", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "1"}, {"CHAP_C", "0b" + base64.StdEncoding.EncodeToString(c)}}
		}},
		{"mutual without CHAP_C", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "1"}}
		}},
		{"mutual bad CHAP_I", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "256"}, {"CHAP_C", "0x0102"}}
		}},
		{"mutual challenge too long", chapInitiator, func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}, {"CHAP_I", "1"}, {"CHAP_C", "0x" + strings.Repeat("ab", 1025)}}
		}},
		{"mutual not configured", "iqn.2024-01.test:oneway", func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", "ow"}, {"CHAP_R", chapR(id, "onewaysecret1", c)}, {"CHAP_I", "1"}, {"CHAP_C", "0x0102"}}
		}},
		{"mutual secret equals initiator secret", "iqn.2024-01.test:samesecret", func(id byte, c []byte) []KeyValue {
			return []KeyValue{{"CHAP_N", "ss"}, {"CHAP_R", chapR(id, "samesecret12", c)}, {"CHAP_I", "1"}, {"CHAP_C", "0x0102"}}
		}},
	}
	for _, f := range fails {
		t.Run(f.name, func(t *testing.T) {
			ex, id, c := chapChallenge(t, a, f.initiator, chapTarget)
			out, done, err := ex.Step("CHAP", f.keys(id, c))
			if !errors.Is(err, ErrAuthFailed) || done || len(out) != 0 {
				t.Fatalf("got %v %v %v, want ErrAuthFailed", out, done, err)
			}
			if _, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(id, chapSecret, c)}}); err == nil || done {
				t.Errorf("retry after failure accepted")
			}
		})
	}

	t.Run("algorithm", func(t *testing.T) {
		for _, keys := range [][]KeyValue{
			{{"CHAP_A", "6,7"}},
			{{"CHAP_A", "55"}},
			{{"CHAP_A", "5"}, {"CHAP_N", chapUser}},
			{{"CHAP_N", chapUser}, {"CHAP_R", "0x00"}},
			{{"SRP_U", "x"}},
		} {
			ex, err := a.Begin(context.Background(), LoginInfo{InitiatorName: chapInitiator, TargetName: chapTarget})
			if err != nil {
				t.Fatal(err)
			}
			if out, done, err := ex.Step("CHAP", keys); !errors.Is(err, ErrAuthFailed) || done || out != nil {
				t.Errorf("%v: %v %v %v", keys, out, done, err)
			}
		}
		ex, _ := a.Begin(context.Background(), LoginInfo{InitiatorName: chapInitiator, TargetName: chapTarget})
		if _, _, err := ex.Step("SRP", []KeyValue{{"CHAP_A", "5"}}); !errors.Is(err, ErrAuthFailed) {
			t.Errorf("method SRP: %v", err)
		}
	})

	t.Run("acl", func(t *testing.T) {
		begin := func(initiator, target string, discovery bool) (AuthExchange, error) {
			return a.Begin(context.Background(), LoginInfo{InitiatorName: initiator, TargetName: target, Discovery: discovery})
		}
		// A refusal is a CHAP exchange that fails at its end whatever
		// the initiator answers (here: the credentials of chapInitiator).
		refused := func(ex AuthExchange, err error) bool {
			if err != nil || !slices.Equal(ex.Methods(), []string{"CHAP"}) {
				return false
			}
			out, _, err := ex.Step("CHAP", []KeyValue{{"CHAP_A", "5"}})
			if err != nil {
				return false
			}
			m := kvMap(out)
			id, _ := strconv.Atoi(m["CHAP_I"])
			c, _ := decodeCHAPBinary(m["CHAP_C"])
			_, done, err := ex.Step("CHAP", []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(byte(id), chapSecret, c)}})
			return !done && errors.Is(err, ErrAuthFailed)
		}
		for _, c := range []struct{ initiator, target string }{
			{"iqn.2024-01.test:other", chapTarget}, // not listed; the "*" export has no CHAP
			{"*", chapTarget},                      // a literal "*" name is no wildcard
			{chapInitiator, iqnPrefix + ":empty"},  // export list present but empty
			{chapInitiator, iqnPrefix + ":open"},   // no export, RequireACL
		} {
			if !refused(begin(c.initiator, c.target, false)) {
				t.Errorf("%s -> %s: not refused at the end of a CHAP exchange", c.initiator, c.target)
			}
		}
		ex, err := begin("iqn.2024-01.test:nochap", chapTarget, false)
		if err != nil || !slices.Equal(ex.Methods(), []string{"None"}) {
			t.Errorf("nochap: %v %v", ex, err)
		}
		if !refused(begin("iqn.2024-01.test:nosecret", chapTarget, false)) {
			t.Errorf("CHAP user without secret: not refused")
		}
		ex, err = begin("iqn.nobody", "", true)
		if err != nil || !slices.Equal(ex.Methods(), []string{"None"}) {
			t.Errorf("discovery: %v %v", ex, err)
		}
		// Without RequireACL a target with no export is open.
		open, _ := testCHAPAuth(t, acl, false)
		ex, err = open.Begin(context.Background(), LoginInfo{InitiatorName: "iqn.x", TargetName: iqnPrefix + ":open"})
		if err != nil || !slices.Equal(ex.Methods(), []string{"None"}) {
			t.Errorf("open target: %v %v", ex, err)
		}
		if !refused(open.Begin(context.Background(), LoginInfo{InitiatorName: "iqn.x", TargetName: chapTarget})) {
			t.Errorf("exported target, unlisted initiator, RequireACL=false: not refused")
		}
		vis := []struct {
			auth      Authenticator
			initiator string
			target    string
			want      bool
		}{
			{a, chapInitiator, chapTarget, true},
			{a, "iqn.2024-01.test:nochap", chapTarget, true},
			{a, "iqn.other", chapTarget, false},
			{a, "iqn.other", iqnPrefix + ":star", true},
			{a, chapInitiator, iqnPrefix + ":empty", false},
			{a, chapInitiator, iqnPrefix + ":open", false},
			{open, chapInitiator, iqnPrefix + ":open", true},
			{open, "iqn.other", chapTarget, false},
		}
		for _, v := range vis {
			if got := v.auth.Visible(v.initiator, v.target); got != v.want {
				t.Errorf("Visible(%s, %s) = %v", v.initiator, v.target, got)
			}
		}
	})

	logs := lb.String()
	for _, s := range []string{chapSecret, chapMSecret, "onewaysecret1", "anysecret123", "samesecret12", "wrongsecret"} {
		if strings.Contains(logs, s) {
			t.Errorf("log contains secret %q", s)
		}
	}
	if !strings.Contains(logs, "initiator="+chapInitiator) || !strings.Contains(logs, "reason=") {
		t.Errorf("refusals not logged:\n%s", logs)
	}
}

// FuzzCHAPStep feeds arbitrary keys into both steps of an exchange: it
// never panics, and never succeeds without the right response.
func FuzzCHAPStep(f *testing.F) {
	f.Add("CHAP_A=5", "CHAP_N=user1\x00CHAP_R=0x00", false)
	f.Add("CHAP_A=5", "", true)
	f.Add("CHAP_A=5", "CHAP_I=7\x00CHAP_C=0x0102030405", true)
	f.Add("CHAP_A=5", "CHAP_I=0x07\x00CHAP_C=0bAQIDBAU=", true)
	f.Add("CHAP_A=5", "CHAP_I=7\x00CHAP_C=0x0102030405060708090a0b0c0d0e0f", true)
	f.Add("CHAP_A=1,5", "CHAP_I=7\x00CHAP_C=0x", true)
	f.Add("CHAP_A=", "CHAP_N=\x00CHAP_R=0b", false)
	f.Add("CHAP_N=user1\x00CHAP_R=0x00", "CHAP_A=5", true)
	acl := staticACL{chapTarget: {{Initiator: chapInitiator, CHAPUser: chapUser, CHAPSecret: chapSecret, MutualUser: chapMUser, MutualSecret: chapMSecret}}}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Rand: &seqReader{}})
	split := func(s string) []KeyValue {
		var kvs []KeyValue
		for _, p := range strings.Split(s, "\x00") {
			if p == "" {
				continue
			}
			k, v, _ := strings.Cut(p, "=")
			kvs = append(kvs, KeyValue{k, v})
		}
		return kvs
	}
	f.Fuzz(func(t *testing.T, s1, s2 string, addRight bool) {
		ex, err := a.Begin(context.Background(), LoginInfo{InitiatorName: chapInitiator, TargetName: chapTarget})
		if err != nil {
			t.Fatal(err)
		}
		out1, done, err := ex.Step("CHAP", split(s1))
		if done {
			t.Fatalf("done after first step %q", s1)
		}
		if err != nil {
			return
		}
		m := kvMap(out1)
		id, _ := strconv.Atoi(m["CHAP_I"])
		c, _ := hex.DecodeString(strings.TrimPrefix(m["CHAP_C"], "0x"))
		in2 := split(s2)
		if addRight {
			in2 = append(in2, KeyValue{"CHAP_N", chapUser}, KeyValue{"CHAP_R", chapR(byte(id), chapSecret, c)})
		}
		out2, done, err := ex.Step("CHAP", in2)
		if err != nil {
			if done || out2 != nil {
				t.Fatalf("error with output: %v %v", out2, done)
			}
			return
		}
		if !done {
			t.Fatalf("second step neither done nor failed: %v", out2)
		}
		// Success needs exactly the right user and response.
		m2 := kvMap(in2)
		r, derr := decodeCHAPBinary(m2["CHAP_R"])
		want := chapResponse(byte(id), []byte(chapSecret), c)
		if m2["CHAP_N"] != chapUser || derr != nil || !bytes.Equal(r, want[:]) {
			t.Fatalf("accepted %v", in2)
		}
		if len(out2) > 0 {
			ic, err := decodeCHAPBinary(m2["CHAP_C"])
			mid, err2 := parseCHAPID(m2["CHAP_I"])
			if err != nil || err2 != nil || bytes.Equal(ic, c) {
				t.Fatalf("mutual answer to bad challenge %v", in2)
			}
			if kvMap(out2)["CHAP_R"] != chapR(mid, chapMSecret, ic) {
				t.Fatalf("mutual answer %v", out2)
			}
		}
		for _, kv := range append(out1, out2...) {
			if strings.Contains(kv.Value, chapSecret) || strings.Contains(kv.Value, chapMSecret) {
				t.Fatalf("secret in output %v", kv)
			}
		}
	})
}

// TestCHAPRawLogin checks the login statuses CHAP produces, with the raw
// test initiator.
func TestCHAPRawLogin(t *testing.T) {
	const ini = "iqn.2024-01.test:raw"
	acl := staticACL{
		iqnPrefix + ":disk1": {{Initiator: ini, CHAPUser: chapUser, CHAPSecret: chapSecret}},
		iqnPrefix + ":disk2": {{Initiator: "iqn.other", CHAPUser: chapUser, CHAPSecret: chapSecret}},
	}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Logger: testLogger(t)})
	_, addr, _ := startServer(t, Config{Authenticator: a}, "disk1", "disk2", "disk3")
	first := func(target, methods string) (*rawClient, *pdu) {
		cl := dialTest(t, addr)
		cl.send(t, cl.loginPDU(0, 1, true, []KeyValue{{"InitiatorName", ini}, {"TargetName", iqnPrefix + ":" + target}, {"AuthMethod", methods}}))
		return cl, cl.recv(t)
	}
	for _, c := range []struct {
		target, methods string
		want            uint16
	}{
		{"disk1", "None", 0x0201}, // CHAP required
		{"disk2", "None", 0x0201}, // not listed: answered as disk1 (TestRefusalsLookAlike)
		{"disk3", "None", 0x0201}, // no export, RequireACL
	} {
		if _, r := first(c.target, c.methods); r.h.u16(36) != c.want {
			t.Errorf("%s %s: status %04x, want %04x", c.target, c.methods, r.h.u16(36), c.want)
		}
	}
	// Operational-stage login without security is refused.
	cl := dialTest(t, addr)
	if _, st := cl.tryLogin(t, iqnPrefix+":disk1", nil); st != 0x0201 {
		t.Errorf("no-auth login status %04x", st)
	}
	for _, secret := range []string{"wrong", chapSecret} {
		cl, r := first("disk1", "None,CHAP")
		kvs, _ := parseText(r.data)
		if r.h.u16(36) != 0 || kvGet(kvs, "AuthMethod") != "CHAP" || r.h[1]&flagTransit != 0 {
			t.Fatalf("AuthMethod: %04x %v", r.h.u16(36), kvs)
		}
		cl.send(t, cl.loginPDU(0, 1, false, []KeyValue{{"CHAP_A", "5"}}))
		r = cl.recv(t)
		kvs, _ = parseText(r.data)
		id, _ := strconv.Atoi(kvGet(kvs, "CHAP_I"))
		ch, err := decodeCHAPBinary(kvGet(kvs, "CHAP_C"))
		if err != nil {
			t.Fatalf("challenge %v: %v", kvs, err)
		}
		cl.send(t, cl.loginPDU(0, 1, true, []KeyValue{{"CHAP_N", chapUser}, {"CHAP_R", chapR(byte(id), secret, ch)}}))
		r = cl.recv(t)
		if secret == "wrong" {
			if r.h.u16(36) != 0x0201 {
				t.Errorf("wrong secret status %04x", r.h.u16(36))
			}
			continue
		}
		if r.h.u16(36) != 0 || r.h[1]&flagTransit == 0 {
			t.Fatalf("auth: %04x flags %#x", r.h.u16(36), r.h[1])
		}
		cl.send(t, cl.loginPDU(1, 3, true, nil))
		if r = cl.recv(t); r.h.u16(36) != 0 || r.h[1]&flagTransit == 0 {
			t.Fatalf("operational: %04x", r.h.u16(36))
		}
	}
}

// chapClientServer starts a server with CHAP for the libiscsi/QEMU tests.
//
//	disk1: initiator ini1 with CHAP u1/s1, mutual t1/ts1
//	disk2: any initiator with CHAP any/anys
//	nochap: initiator ini2 without CHAP
//	open: no export
func chapClientServer(t *testing.T, require bool) string {
	acl := staticACL{
		iqnPrefix + ":disk1":  {{Initiator: cliIni1, CHAPUser: "u1", CHAPSecret: "secret1secret1", MutualUser: "t1", MutualSecret: "tsecret1tsecret1"}},
		iqnPrefix + ":disk2":  {{Initiator: "*", CHAPUser: "any", CHAPSecret: "anysecret2any"}},
		iqnPrefix + ":nochap": {{Initiator: cliIni2}},
	}
	lb := &logBuf{}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: require, Logger: slog.New(slog.NewTextHandler(lb, nil))})
	t.Cleanup(func() {
		logs := lb.String()
		for _, s := range []string{"secret1secret1", "tsecret1tsecret1", "anysecret2any", "wrongsecret"} {
			if strings.Contains(logs, s) {
				t.Errorf("log contains secret %q", s)
			}
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("authenticator log:\n%s", logs)
		}
	})
	_, addr, _ := startServer(t, Config{Authenticator: a}, "disk1", "disk2", "nochap", "open")
	return addr
}

const (
	cliIni1 = "iqn.2024-01.test:ini1"
	cliIni2 = "iqn.2024-01.test:ini2"
)

func chapURL(cred, addr, name, args string) string {
	if cred != "" {
		cred += "@"
	}
	return "iscsi://" + cred + addr + "/" + iqnPrefix + ":" + name + "/0" + args
}

func TestCHAPLibiscsi(t *testing.T) {
	needTool(t, "iscsi-inq")
	needTool(t, "iscsi-ls")
	addr := chapClientServer(t, true)
	cases := []struct {
		name, ini, cred, target, args string
		ok                            bool
	}{
		{"one-way", cliIni1, "u1%secret1secret1", "disk1", "", true},
		{"wrong secret", cliIni1, "u1%wrongsecret", "disk1", "", false},
		{"wrong user", cliIni1, "u2%secret1secret1", "disk1", "", false},
		{"no credentials", cliIni1, "", "disk1", "", false},
		{"user without secret", cliIni1, "u1", "disk1", "", false},
		{"initiator not listed", cliIni2, "u1%secret1secret1", "disk1", "", false},
		{"mutual", cliIni1, "u1%secret1secret1", "disk1", "?target_user=t1&target_password=tsecret1tsecret1", true},
		{"mutual wrong target secret", cliIni1, "u1%secret1secret1", "disk1", "?target_user=t1&target_password=wrongsecret", false},
		{"mutual wrong target user", cliIni1, "u1%secret1secret1", "disk1", "?target_user=t2&target_password=tsecret1tsecret1", false},
		{"mutual not configured", cliIni2, "any%anysecret2any", "disk2", "?target_user=t1&target_password=tsecret1tsecret1", false},
		{"star", "iqn.2024-01.test:whoever", "any%anysecret2any", "disk2", "", true},
		{"star wrong secret", "iqn.2024-01.test:whoever", "any%wrongsecret", "disk2", "", false},
		{"no chap export", cliIni2, "", "nochap", "", true},
		{"no chap export, credentials offered", cliIni2, "u1%secret1secret1", "nochap", "", true},
		{"no chap export, other initiator", cliIni1, "", "nochap", "", false},
		{"no export, RequireACL", cliIni1, "", "open", "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			url := chapURL(c.cred, addr, c.target, c.args)
			out, err := run(t, 20*time.Second, "iscsi-inq", "-i", c.ini, url)
			if c.ok && (err != nil || !strings.Contains(out, "UKAI")) {
				t.Fatalf("iscsi-inq -i %s %s: %v\n%s", c.ini, url, err, out)
			}
			if !c.ok && err == nil {
				t.Fatalf("iscsi-inq -i %s %s succeeded:\n%s", c.ini, url, out)
			}
			t.Logf("iscsi-inq -i %s %s: err=%v\n%s", c.ini, url, err, strings.TrimSpace(out))
		})
	}
	t.Run("discovery", func(t *testing.T) {
		// Without -s iscsi-ls only does the discovery session; with -s it
		// also logs in to every target shown, with the URL credentials.
		for _, c := range []struct {
			ini, cred string
			luns      bool
			want      []string
		}{
			{cliIni1, "", false, []string{"disk1", "disk2"}},
			{cliIni1, "u1%secret1secret1@", false, []string{"disk1", "disk2"}},
			{cliIni2, "", false, []string{"disk2", "nochap"}},
			{cliIni2, "any%anysecret2any@", true, []string{"disk2", "nochap"}},
			{"iqn.2024-01.test:stranger", "", false, []string{"disk2"}},
			{"iqn.2024-01.test:stranger", "any%anysecret2any@", true, []string{"disk2"}},
		} {
			args := []string{"-i", c.ini}
			if c.luns {
				args = append(args, "-s")
			}
			args = append(args, "iscsi://"+c.cred+addr)
			out, err := run(t, 20*time.Second, "iscsi-ls", args...)
			if err != nil {
				t.Fatalf("iscsi-ls %v: %v\n%s", args, err, out)
			}
			for _, n := range []string{"disk1", "disk2", "nochap", "open"} {
				if strings.Contains(out, iqnPrefix+":"+n) != slices.Contains(c.want, n) {
					t.Errorf("iscsi-ls %v: %s shown=%v:\n%s", args, n, !slices.Contains(c.want, n), out)
				}
			}
			if c.luns && strings.Count(out, "Lun:0") != len(c.want) {
				t.Errorf("iscsi-ls %v: LUNs missing:\n%s", args, out)
			}
			t.Logf("iscsi-ls %v:\n%s", args, strings.TrimSpace(out))
		}
	})
}

func TestCHAPLibiscsiOpen(t *testing.T) {
	needTool(t, "iscsi-inq")
	addr := chapClientServer(t, false)
	// A target with no export is open to all without CHAP...
	if out, err := run(t, 20*time.Second, "iscsi-inq", "-i", "iqn.2024-01.test:stranger", chapURL("", addr, "open", "")); err != nil {
		t.Fatalf("open target: %v\n%s", err, out)
	}
	// ...and shown in discovery; exported targets keep their ACL.
	out, err := run(t, 20*time.Second, "iscsi-ls", "-i", "iqn.2024-01.test:stranger", "-s", "iscsi://any%anysecret2any@"+addr)
	if err != nil || !strings.Contains(out, iqnPrefix+":open") || strings.Contains(out, iqnPrefix+":disk1") || strings.Count(out, "Lun:0") != 2 {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
	if out, err := run(t, 20*time.Second, "iscsi-inq", "-i", "iqn.2024-01.test:stranger", chapURL("", addr, "disk1", "")); err == nil {
		t.Fatalf("exported target without CHAP succeeded:\n%s", out)
	}
}

func TestCHAPQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	addr := chapClientServer(t, true)
	for _, c := range []struct {
		name, secret string
		ok           bool
	}{
		{"right secret", "secret1secret1", true},
		{"wrong secret", "wrongsecret", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			out, err := run(t, 60*time.Second, "qemu-io",
				"--object", "secret,id=sec0,data="+c.secret,
				"--image-opts", "-c", "write -P 0xcd 0 1M", "-c", "read -P 0xcd 0 1M",
				"driver=iscsi,transport=tcp,portal="+addr+",target="+iqnPrefix+":disk1,lun=0,initiator-name="+cliIni1+",user=u1,password-secret=sec0")
			failed := err != nil || strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "rror")
			if c.ok && failed {
				t.Fatalf("qemu-io: %v\n%s", err, out)
			}
			if !c.ok && !failed {
				t.Fatalf("qemu-io with a wrong secret succeeded:\n%s", out)
			}
			t.Logf("qemu-io: err=%v\n%s", err, strings.TrimSpace(out))
		})
	}
}

// TestCHAPIscsiTestCU runs a few libiscsi conformance suites over a CHAP
// login.
func TestCHAPIscsiTestCU(t *testing.T) {
	needTool(t, "iscsi-test-cu")
	addr := chapClientServer(t, true)
	for _, suite := range []string{"ALL.Read10", "ALL.Write10", "ALL.iSCSITMF"} {
		t.Run(suite, func(t *testing.T) {
			out, err := run(t, 300*time.Second, "iscsi-test-cu", "-d", cuVerbose(), "--test="+suite, chapURL("any%anysecret2any", addr, "disk2", ""))
			summary := out
			if i := strings.Index(out, "Run Summary"); i >= 0 {
				summary = out[i:]
			}
			t.Logf("%s:\n%s", suite, summary)
			if err != nil || !strings.Contains(summary, "Run Summary") {
				t.Errorf("iscsi-test-cu %s: %v\n%s", suite, err, out)
			}
		})
	}
}
