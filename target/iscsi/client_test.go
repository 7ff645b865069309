package iscsi

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func needTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s not installed: %v", name, err)
	}
}

func TestDiscoveryAndInquiry(t *testing.T) {
	needTool(t, "iscsi-ls")
	_, addr, _ := startServer(t, Config{}, "disk1", "disk2", "disk3")
	out, err := run(t, 20*time.Second, "iscsi-ls", "-s", "iscsi://"+addr)
	if err != nil {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
	for _, n := range []string{"disk1", "disk2", "disk3"} {
		if !strings.Contains(out, iqnPrefix+":"+n) {
			t.Errorf("iscsi-ls output lacks %s:\n%s", n, out)
		}
	}
	if !strings.Contains(out, addr) {
		t.Errorf("iscsi-ls output lacks portal %s:\n%s", addr, out)
	}
	out, err = run(t, 20*time.Second, "iscsi-inq", lunURL(addr, "disk1"))
	if err != nil {
		t.Fatalf("iscsi-inq: %v\n%s", err, out)
	}
	if !strings.Contains(out, "UKAI") {
		t.Errorf("iscsi-inq output:\n%s", out)
	}
	// Unknown target: login must fail.
	out, err = run(t, 20*time.Second, "iscsi-inq", lunURL(addr, "nosuch"))
	if err == nil {
		t.Errorf("iscsi-inq on a missing target succeeded:\n%s", out)
	}
}

func TestQemuIOWriteRead(t *testing.T) {
	needTool(t, "qemu-io")
	for _, digest := range []string{"none", "crc32c"} {
		t.Run(digest, func(t *testing.T) {
			_, addr, _ := startServer(t, Config{}, "disk1")
			out, err := run(t, 60*time.Second, "qemu-io", "--image-opts",
				"-c", "write -P 0xab 0 4M", "-c", "read -P 0xab 0 4M",
				"-c", "write -P 0x12 1M 512", "-c", "read -P 0x12 1M 512", "-c", "read -P 0xab 1049088 1M",
				"driver=iscsi,transport=tcp,portal="+addr+",target="+iqnPrefix+":disk1,lun=0,header-digest="+digest)
			if err != nil || strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
				t.Fatalf("qemu-io: %v\n%s", err, out)
			}
		})
	}
}

func TestTwoSessionsAtOnce(t *testing.T) {
	needTool(t, "qemu-io")
	s, addr, _ := startServer(t, Config{}, "disk1")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	outs := make([]string, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := []string{"0", "8M"}[i]
			outs[i], errs[i] = run(t, 60*time.Second, "qemu-io", "-f", "raw",
				"-c", "write -P 0x5"+string(rune('0'+i))+" "+off+" 4M",
				"-c", "read -P 0x5"+string(rune('0'+i))+" "+off+" 4M",
				"-c", "write -P 0x5"+string(rune('0'+i))+" "+off+" 4M",
				lunURL(addr, "disk1"))
		}()
	}
	// Watch for both sessions at once.
	deadline := time.Now().Add(30 * time.Second)
	maxSeen := 0
	for time.Now().Before(deadline) {
		maxSeen = max(maxSeen, len(s.Sessions()))
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
			deadline = time.Time{}
		case <-time.After(5 * time.Millisecond):
		}
	}
	wg.Wait()
	for i := range 2 {
		if errs[i] != nil || strings.Contains(outs[i], "failed") {
			t.Fatalf("qemu-io %d: %v\n%s", i, errs[i], outs[i])
		}
	}
	t.Logf("max concurrent sessions seen: %d", maxSeen)
}

func TestQemuImgBench(t *testing.T) {
	needTool(t, "qemu-img")
	_, addr, _ := startServer(t, Config{}, "disk1")
	start := time.Now()
	out, err := run(t, 120*time.Second, "qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "4M", "-d", "16", "-c", "200", lunURL(addr, "disk1"))
	if err != nil {
		t.Fatalf("qemu-img bench write: %v\n%s", err, out)
	}
	t.Logf("write bench (%v): %s", time.Since(start), strings.TrimSpace(out))
	start = time.Now()
	out, err = run(t, 120*time.Second, "qemu-img", "bench", "-f", "raw", "-t", "none", "-s", "4M", "-d", "16", "-c", "200", lunURL(addr, "disk1"))
	if err != nil {
		t.Fatalf("qemu-img bench read: %v\n%s", err, out)
	}
	t.Logf("read bench (%v): %s", time.Since(start), strings.TrimSpace(out))
}

func TestDisconnectMidWrite(t *testing.T) {
	needTool(t, "qemu-io")
	s, addr, tt := startServer(t, Config{}, "disk1")
	tt.be[iqnPrefix+":disk1"].delay.Store(int64(200 * time.Millisecond))
	// A client killed while its writes are in flight.
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	cmd := exec.CommandContext(ctx, "qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "1M", "-d", "16", "-c", "1000", lunURL(addr, "disk1"))
	_ = cmd.Run()
	cancel()
	// A raw TCP client that sends half a PDU and vanishes.
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	nc.Write([]byte{0x43, 0x87, 0, 0, 0, 0, 0, 10})
	nc.Close()
	tt.be[iqnPrefix+":disk1"].delay.Store(0)
	out, err := run(t, 30*time.Second, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k", lunURL(addr, "disk1"))
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("login after a broken client: %v\n%s", err, out)
	}
	// Every session of the killed client eventually goes away.
	deadline := time.Now().Add(10 * time.Second)
	for len(s.Sessions()) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(s.Sessions()); n != 0 {
		t.Errorf("%d sessions left: %+v", n, s.Sessions())
	}
}

func TestPortClash(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tt := &testTargets{}
	s, err := NewServer(Config{Listen: ln.Addr().String()}, tt)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Listen()
	if err == nil {
		t.Fatal("Listen on a used port succeeded")
	}
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.HasPrefix(err.Error(), "iscsi.listen "+ln.Addr().String()+": address already in use") {
		t.Errorf("Listen error = %q", err)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Error(err)
	}
}

func TestCloseEndsSessions(t *testing.T) {
	s, addr, _ := startServer(t, Config{}, "disk1")
	c := dialTest(t, addr)
	c.login(t, iqnPrefix+":disk1", nil)
	if n := len(s.Sessions()); n != 1 {
		t.Fatalf("sessions = %d", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.nc.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after Close")
	}
	if n := len(s.Sessions()); n != 0 {
		t.Errorf("sessions after Close = %d", n)
	}
}

func TestDropTarget(t *testing.T) {
	s, addr, tt := startServer(t, Config{}, "disk1", "disk2")
	c1 := dialTest(t, addr)
	c1.login(t, iqnPrefix+":disk1", nil)
	c2 := dialTest(t, addr)
	c2.login(t, iqnPrefix+":disk2", nil)
	tt.remove(iqnPrefix + ":disk1")
	s.DropTarget(iqnPrefix + ":disk1")
	c1.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c1.nc.Read(make([]byte, 1)); err == nil {
		t.Error("session of a dropped target still open")
	}
	// disk2 still works.
	c2.nop(t, []byte("ping"))
	if got := s.Sessions(); len(got) != 1 || got[0].Target != iqnPrefix+":disk2" {
		t.Errorf("sessions = %+v", got)
	}
}

// TestIscsiTestCU runs libiscsi's conformance suites against the target.
// The iSCSI-layer suites must pass; failures are reported with the tool's
// output.
func TestIscsiTestCU(t *testing.T) {
	needTool(t, "iscsi-test-cu")
	_, addr, _ := startServer(t, Config{}, "cu")
	suites := []string{
		"ALL.iSCSITMF", "ALL.iSCSIcmdsn", "ALL.iSCSIResiduals", "ALL.iSCSIdatasn",
		"ALL.iSCSINop", "ALL.Read10", "ALL.Write10",
	}
	if s := os.Getenv("ISCSI_TEST_CU_SUITES"); s != "" {
		suites = strings.Split(s, ",")
	}
	for _, suite := range suites {
		t.Run(suite, func(t *testing.T) {
			out, err := run(t, 300*time.Second, "iscsi-test-cu", "-d", cuVerbose(), "--test="+suite, lunURL(addr, "cu"))
			summary := out
			if i := strings.Index(out, "Run Summary"); i >= 0 {
				summary = out[i:]
			}
			t.Logf("%s:\n%s", suite, summary)
			if strings.Contains(summary, "tests      0      0") {
				// e.g. iSCSINop is absent from some libiscsi builds.
				t.Logf("suite %s has no tests in this iscsi-test-cu build", suite)
			}
			if err != nil {
				t.Errorf("iscsi-test-cu %s: %v\n%s", suite, err, out)
			}
		})
	}
}

func cuVerbose() string {
	if os.Getenv("ISCSI_TEST_CU_VERBOSE") != "" {
		return "-V"
	}
	return "-d"
}
