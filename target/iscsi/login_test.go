package iscsi

import (
	"testing"
)

// TestLoginOmittedKeysKeepTargetLimits: an initiator that leaves out
// ImmediateData, FirstBurstLength and MaxBurstLength (and ignores the
// target's declarations of them) still gets the target's stricter limits:
// immediate data is refused and R2Ts ask for at most MaxBurstLength.
func TestLoginOmittedKeysKeepTargetLimits(t *testing.T) {
	_, addr, _ := startServer(t, Config{FirstBurstLength: 4096, MaxBurstLength: 16384, DisableImmediateData: true}, "disk1")
	cl := dialTest(t, addr)
	cl.send(t, cl.loginPDU(1, 3, true, []KeyValue{{"InitiatorName", "iqn.2024-01.test:raw"}, {"TargetName", iqnPrefix + ":disk1"}}))
	r := cl.recv(t)
	if st := r.h.u16(36); st != 0 {
		t.Fatalf("login status %04x", st)
	}
	kvs, _ := parseText(r.data)
	if kvGet(kvs, "ImmediateData") != "No" || kvGet(kvs, "MaxBurstLength") != "16384" || kvGet(kvs, "FirstBurstLength") != "4096" {
		t.Errorf("target did not declare its limits: %v", kvs)
	}
	for range 2 {
		if r.h[1]&flagTransit != 0 {
			break
		}
		// The target waits for answers; this initiator sends none.
		cl.statSN = r.h.u32(offStatSN) + 1
		cl.send(t, cl.loginPDU(1, 3, true, nil))
		r = cl.recv(t)
		if st := r.h.u16(36); st != 0 {
			t.Fatalf("login status %04x", st)
		}
	}
	if r.h[1] != flagTransit|1<<2|3 || r.h.u16(14) == 0 {
		t.Fatalf("login did not complete: flags %#x tsih %d", r.h[1], r.h.u16(14))
	}
	cl.statSN = r.h.u32(offStatSN) + 1
	cl.itt++
	cl.clearUA(t)

	// Immediate data is refused.
	cl.cmd(t, write10(0, 1), 512, false, true, make([]byte, 512), true)
	if r = cl.recv(t); r.h.opcode() != opReject {
		t.Errorf("write with immediate data: got opcode %#x, want a Reject", r.h.opcode())
	}
	// A 64 KiB write is solicited in bursts of at most 16 KiB.
	itt := cl.cmd(t, write10(0, 128), 64<<10, false, true, nil, true)
	r = cl.recv(t)
	if r.h.opcode() != opR2T || r.h.itt() != itt {
		t.Fatalf("expected an R2T, got opcode %#x", r.h.opcode())
	}
	if l := r.h.u32(offResidual); l != 16384 {
		t.Errorf("R2T desired length %d, want 16384 (the target's MaxBurstLength)", l)
	}
}

// TestLoginAnswersDeclarations: an initiator that answers the target's
// declarations completes the login with the answered values, and the
// target does not answer the answers.
func TestLoginAnswersDeclarations(t *testing.T) {
	_, addr, _ := startServer(t, Config{FirstBurstLength: 4096, MaxBurstLength: 16384, DisableImmediateData: true}, "disk1")
	cl := dialTest(t, addr)
	cl.send(t, cl.loginPDU(1, 3, true, []KeyValue{{"InitiatorName", "iqn.2024-01.test:raw"}, {"TargetName", iqnPrefix + ":disk1"}, {"MaxBurstLength", "8192"}}))
	r := cl.recv(t)
	kvs, _ := parseText(r.data)
	if r.h[1]&flagTransit != 0 || kvGet(kvs, "MaxBurstLength") != "8192" || kvGet(kvs, "ImmediateData") != "No" || kvGet(kvs, "FirstBurstLength") != "4096" {
		t.Fatalf("first response flags %#x kvs %v", r.h[1], kvs)
	}
	cl.statSN = r.h.u32(offStatSN) + 1
	cl.send(t, cl.loginPDU(1, 3, true, []KeyValue{{"ImmediateData", "No"}, {"FirstBurstLength", "4096"}}))
	r = cl.recv(t)
	kvs, _ = parseText(r.data)
	if r.h.u16(36) != 0 || r.h[1] != flagTransit|1<<2|3 || len(kvs) != 0 {
		t.Fatalf("final response status %04x flags %#x kvs %v", r.h.u16(36), r.h[1], kvs)
	}
}

// TestLoginSecurityToFullFeatureDeclares: an initiator that goes from the
// security stage straight to full feature phase is led through the
// operational stage when the target has limits to declare.
func TestLoginSecurityToFullFeatureDeclares(t *testing.T) {
	_, addr, _ := startServer(t, Config{DisableImmediateData: true}, "disk1")
	cl := dialTest(t, addr)
	cl.send(t, cl.loginPDU(0, 3, true, []KeyValue{{"InitiatorName", "iqn.2024-01.test:raw"}, {"TargetName", iqnPrefix + ":disk1"}, {"AuthMethod", "None"}}))
	r := cl.recv(t)
	if r.h.u16(36) != 0 || r.h[1] != flagTransit|0<<2|1 {
		t.Fatalf("security response status %04x flags %#x, want transit to the operational stage", r.h.u16(36), r.h[1])
	}
	cl.statSN = r.h.u32(offStatSN) + 1
	cl.send(t, cl.loginPDU(1, 3, true, nil))
	r = cl.recv(t)
	kvs, _ := parseText(r.data)
	if r.h[1]&flagTransit != 0 || kvGet(kvs, "ImmediateData") != "No" {
		t.Fatalf("operational response flags %#x kvs %v", r.h[1], kvs)
	}
	cl.statSN = r.h.u32(offStatSN) + 1
	cl.send(t, cl.loginPDU(1, 3, true, []KeyValue{{"ImmediateData", "No"}}))
	if r = cl.recv(t); r.h.u16(36) != 0 || r.h[1] != flagTransit|1<<2|3 {
		t.Fatalf("final response status %04x flags %#x", r.h.u16(36), r.h[1])
	}
}
