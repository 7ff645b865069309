package iscsi

import (
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// loginTrace runs a CHAP login with the raw initiator and returns what an
// initiator can observe of it: per response, status, flags and the keys
// (values of CHAP_I and CHAP_C, which are random, left out); the
// exchange stops at the first failure.
func loginTrace(t *testing.T, addr string, first []KeyValue, methods, user, secret string) []string {
	t.Helper()
	cl := dialTest(t, addr)
	var trace []string
	step := func(p *pdu) (*pdu, bool) {
		cl.send(t, p)
		r := cl.recv(t)
		kvs, _ := parseText(r.data)
		var keys []string
		for _, kv := range kvs {
			if kv.Key == "CHAP_I" || kv.Key == "CHAP_C" {
				keys = append(keys, kv.Key)
			} else {
				keys = append(keys, kv.Key+"="+kv.Value)
			}
		}
		trace = append(trace, fmt.Sprintf("status=%04x flags=%#x %v", r.h.u16(36), r.h[1], keys))
		cl.statSN = r.h.u32(offStatSN) + 1
		return r, r.h.u16(36) == 0
	}
	r, ok := step(cl.loginPDU(0, 1, false, append(first, KeyValue{"AuthMethod", methods})))
	if !ok {
		return trace
	}
	r, ok = step(cl.loginPDU(0, 1, false, []KeyValue{{"CHAP_A", "5"}}))
	if !ok {
		return trace
	}
	kvs, _ := parseText(r.data)
	id, _ := strconv.Atoi(kvGet(kvs, "CHAP_I"))
	ch, err := decodeCHAPBinary(kvGet(kvs, "CHAP_C"))
	if err != nil {
		t.Fatalf("challenge %v: %v", kvs, err)
	}
	step(cl.loginPDU(0, 1, true, []KeyValue{{"CHAP_N", user}, {"CHAP_R", chapR(byte(id), secret, ch)}}))
	return trace
}

// TestRefusalsLookAlike: a login to an unknown target, to a target the
// initiator is not on the export list of, to a target with no export,
// and one with a wrong CHAP secret get the same answers at the same steps
// (the CHAP exchange runs to its end, then 02/01), so target names cannot
// be probed; the target logs the true reason.
func TestRefusalsLookAlike(t *testing.T) {
	const ini = "iqn.2024-01.test:raw"
	acl := staticACL{
		iqnPrefix + ":disk1": {{Initiator: ini, CHAPUser: chapUser, CHAPSecret: chapSecret}},
		iqnPrefix + ":disk2": {{Initiator: "iqn.other", CHAPUser: chapUser, CHAPSecret: chapSecret}},
		iqnPrefix + ":disk4": {{Initiator: ini, CHAPUser: chapUser}}, // no secret
	}
	lb := &logBuf{}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Logger: slog.New(slog.NewTextHandler(lb, nil))})
	srvLog := &logBuf{}
	_, addr, _ := startServer(t, Config{Authenticator: a, Logger: slog.New(slog.NewTextHandler(srvLog, nil))}, "disk1", "disk2", "disk3", "disk4")
	cases := []struct{ name, target, reason string }{
		{"wrong secret", "disk1", "wrong CHAP response"},
		{"not on the export list", "disk2", "initiator not on the export list"},
		{"no export", "disk3", "target has no export"},
		{"export without secret", "disk4", "export has no CHAP secret"},
		{"unknown target", "nosuch", "unknown target"},
	}
	for _, m := range []string{"CHAP,None", "None"} {
		var want []string
		for i, c := range cases {
			first := []KeyValue{{"InitiatorName", ini}, {"TargetName", iqnPrefix + ":" + c.target}}
			got := loginTrace(t, addr, first, m, chapUser, "wrongsecret")
			if i == 0 {
				want = got
				last := got[len(got)-1]
				if !strings.HasPrefix(last, "status=0201") {
					t.Fatalf("AuthMethod=%s %s: %v, want to end in 02/01", m, c.name, got)
				}
				continue
			}
			if !slices.Equal(got, want) {
				t.Errorf("AuthMethod=%s %s:\n got %v\nwant %v (as %s)", m, c.name, got, want, cases[0].name)
			}
		}
	}
	// Skipping the security stage: the same answer too.
	for _, c := range cases {
		cl := dialTest(t, addr)
		if _, st := cl.tryLogin(t, iqnPrefix+":"+c.target, nil); st != 0x0201 {
			t.Errorf("%s: operational-stage login status %04x, want 0201", c.name, st)
		}
	}
	// The true reasons are logged on the target side.
	deadline := time.Now().Add(5 * time.Second)
	for _, c := range cases {
		for !strings.Contains(lb.String()+srvLog.String(), c.reason) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if !strings.Contains(lb.String()+srvLog.String(), c.reason) {
			t.Errorf("reason %q not logged:\n%s\n%s", c.reason, lb.String(), srvLog.String())
		}
	}
	for _, s := range []string{chapSecret, "wrongsecret"} {
		if strings.Contains(lb.String()+srvLog.String(), s) {
			t.Errorf("log contains secret %q", s)
		}
	}
	// The right secret still logs in.
	tr := loginTrace(t, addr, []KeyValue{{"InitiatorName", ini}, {"TargetName", iqnPrefix + ":disk1"}}, "CHAP", chapUser, chapSecret)
	if last := tr[len(tr)-1]; !strings.HasPrefix(last, "status=0000 flags=0x81") {
		t.Errorf("right secret: %v", tr)
	}
}

// TestDiscoveryCHAP: with discovery CHAP configured, a discovery session
// needs it (one-way, or mutual when the initiator asks); without it,
// discovery stays open.
func TestDiscoveryCHAP(t *testing.T) {
	const ini = "iqn.2024-01.test:raw"
	acl := staticACL{iqnPrefix + ":disk1": {{Initiator: ini}}}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Logger: testLogger(t),
		Discovery: &Export{CHAPUser: "disc", CHAPSecret: "discoverysecret1", MutualUser: "portal", MutualSecret: "portalsecret0001"}})
	_, addr, _ := startServer(t, Config{Authenticator: a}, "disk1")
	disc := []KeyValue{{"InitiatorName", ini}, {"SessionType", "Discovery"}}
	for _, c := range []struct {
		name, methods, user, secret string
	}{
		{"no CHAP", "None", "", ""},
		{"wrong secret", "CHAP,None", "disc", "wrongsecret"},
		{"wrong user", "CHAP", "other", "discoverysecret1"},
		{"the export's credentials", "CHAP", chapUser, chapSecret},
	} {
		tr := loginTrace(t, addr, disc, c.methods, c.user, c.secret)
		if last := tr[len(tr)-1]; !strings.HasPrefix(last, "status=0201") {
			t.Errorf("%s: %v, want 02/01", c.name, tr)
		}
	}
	cl := dialTest(t, addr)
	if _, st := cl.tryLogin(t, "", nil); st != 0x0201 {
		t.Errorf("discovery login skipping security: status %04x, want 0201", st)
	}
	// The right secret: SendTargets answers.
	tr := loginTrace(t, addr, disc, "CHAP", "disc", "discoverysecret1")
	if last := tr[len(tr)-1]; !strings.HasPrefix(last, "status=0000 flags=0x81") {
		t.Fatalf("right secret: %v", tr)
	}
	// Without discovery CHAP, discovery needs none.
	open := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Logger: testLogger(t)})
	_, addr2, _ := startServer(t, Config{Authenticator: open}, "disk1")
	cl = dialTest(t, addr2)
	if _, st := cl.tryLogin(t, "", nil); st != 0 {
		t.Errorf("discovery without discovery CHAP: status %04x", st)
	}
}

// TestDiscoveryCHAPLibiscsi: libiscsi's iscsi-ls discovers with the
// discovery CHAP credentials of its URL, one-way and mutual, and is
// refused without them or with wrong ones.
func TestDiscoveryCHAPLibiscsi(t *testing.T) {
	needTool(t, "iscsi-ls")
	acl := staticACL{iqnPrefix + ":disk1": {{Initiator: cliIni1}}}
	a := NewCHAPAuthenticator(CHAPConfig{ACL: acl, RequireACL: true, Logger: testLogger(t),
		Discovery: &Export{CHAPUser: "disc", CHAPSecret: "discoverysecret1", MutualUser: "portal", MutualSecret: "portalsecret0001"}})
	_, addr, _ := startServer(t, Config{Authenticator: a}, "disk1", "disk2")
	for _, c := range []struct {
		name, cred, args string
		ok               bool
	}{
		{"one-way", "disc%discoverysecret1@", "", true},
		{"mutual", "disc%discoverysecret1@", "?target_user=portal&target_password=portalsecret0001", true},
		{"no credentials", "", "", false},
		{"wrong secret", "disc%wrongsecret00@", "", false},
		{"wrong user", "other%discoverysecret1@", "", false},
		{"mutual wrong target secret", "disc%discoverysecret1@", "?target_user=portal&target_password=wrongsecret00", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			out, err := run(t, 20*time.Second, "iscsi-ls", "-i", cliIni1, "iscsi://"+c.cred+addr+c.args)
			listed := strings.Contains(out, iqnPrefix+":disk1")
			if c.ok && (err != nil || !listed || strings.Contains(out, iqnPrefix+":disk2")) {
				t.Fatalf("iscsi-ls: %v\n%s", err, out)
			}
			if !c.ok && (err == nil || listed) {
				t.Fatalf("iscsi-ls without the right discovery CHAP listed targets: %v\n%s", err, out)
			}
		})
	}
}
