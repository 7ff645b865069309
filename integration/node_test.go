package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestImageLifecycleCLI(t *testing.T) {
	n := newNode(t, "n1")
	n.start()

	out := n.mustCLI("image", "create", "vm1", "--size", "10M", "--block-size", "1M")
	if !strings.Contains(out, "created image vm1") {
		t.Fatalf("create said %q", out)
	}
	m := n.imageJSON("vm1", false)
	if m["name"] != "vm1" || m["size"] != float64(10<<20) || m["block_size"] != float64(1<<20) {
		t.Fatalf("info: %v", m)
	}
	locs := m["locations"].([]any)
	if len(locs) != 1 || locs[0].(map[string]any)["node"] != "n1" || locs[0].(map[string]any)["out_of_sync"] != float64(0) {
		t.Fatalf("locations: %v", locs)
	}
	if _, ok := m["blocks"]; ok {
		t.Fatal("blocks shown without --blocks")
	}
	blocks := n.imageJSON("vm1", true)["blocks"].([]any)
	if len(blocks) != 10 {
		t.Fatalf("--blocks gave %d entries, want 10", len(blocks))
	}
	for i, b := range blocks {
		st := b.(map[string]any)["n1"].(map[string]any)["sync_status"]
		if st != float64(0) {
			t.Fatalf("block %d of n1: sync_status %v", i, st)
		}
	}

	// Default block size 4 MiB, odd size with a partial last block.
	n.mustCLI("image", "create", "vm2", "--size", "9M")
	if m := n.imageJSON("vm2", false); m["block_size"] != float64(4<<20) || m["num_blocks"] != float64(3) {
		t.Fatalf("vm2: %v", m)
	}
	list := n.mustCLI("image", "list")
	if !strings.Contains(list, "vm1") || !strings.Contains(list, "vm2") {
		t.Fatalf("list: %s", list)
	}

	// Both targets are discoverable at once, without a restart.
	ls, err := run(t, 30*time.Second, "iscsi-ls", "iscsi://"+n.portal)
	if err != nil || !strings.Contains(ls, n.prefix+":vm1") || !strings.Contains(ls, n.prefix+":vm2") {
		t.Fatalf("discovery: %v\n%s", err, ls)
	}

	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"image", "create", "vm1", "--size", "1M"}, "already exists"},
		{[]string{"image", "create", "Bad_Name", "--size", "1M"}, "image name"},
		{[]string{"image", "create", "zero", "--size", "0"}, "greater than zero"},
		{[]string{"image", "create", "odd", "--size", "1000"}, "multiple of 512"},
		{[]string{"image", "create", "bs", "--size", "1M", "--block-size", "3M"}, "power of two"},
		{[]string{"image", "create", "bs2", "--size", "1M", "--block-size", "32K"}, "power of two"},
		{[]string{"image", "create", "nosize"}, "--size is required"},
		{[]string{"image", "create", "units", "--size", "10X"}, "invalid size"},
		{[]string{"image", "info", "nope"}, "not found"},
		{[]string{"image", "delete", "nope"}, "not found"},
		{[]string{"image", "list", "-o", "xml"}, "want table, json or yaml"},
	} {
		out, errOut, err := n.cli(bad.args...)
		if err == nil || !strings.Contains(errOut, bad.want) {
			t.Errorf("ukai %s: err=%v stderr=%q stdout=%q, want a failure mentioning %q", strings.Join(bad.args, " "), err, errOut, out, bad.want)
		}
	}

	n.mustCLI("image", "delete", "vm1", "--now")
	if _, errOut, err := n.cli("image", "info", "vm1"); err == nil || !strings.Contains(errOut, "not found") {
		t.Fatalf("info after delete: %v %s", err, errOut)
	}
	ls, _ = run(t, 30*time.Second, "iscsi-ls", "iscsi://"+n.portal)
	if strings.Contains(ls, n.prefix+":vm1") || !strings.Contains(ls, n.prefix+":vm2") {
		t.Fatalf("discovery after delete:\n%s", ls)
	}
	if out, err := run(t, 30*time.Second, "iscsi-inq", n.url("vm1")); err == nil {
		t.Fatalf("login to a deleted image worked:\n%s", out)
	}
	files, _ := filepath.Glob(filepath.Join(n.dir, "data", "images", "*.img"))
	if len(files) != 1 {
		t.Fatalf("image files after delete: %v", files)
	}
	// The name is free again, with fresh, zeroed data.
	n.mustCLI("image", "create", "vm1", "--size", "1M", "--block-size", "64K")
	qemuIO(t, n.url("vm1"), "read -P 0 0 1M")
}

func TestDataAcrossBlocksSurvivesRestart(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	// 64 KiB blocks, 16 blocks and a partial 17th.
	size := 16*64<<10 + 8<<10
	n.mustCLI("image", "create", "data", "--size", fmt.Sprint(size), "--block-size", "64K")
	url := n.url("data")
	writes := []string{
		"write -P 0x11 0 64k",     // exactly block 0
		"write -P 0x22 60k 8k",    // across the 0/1 boundary
		"write -P 0x33 120k 200k", // spans blocks 1..4
		"write -P 0x44 1020k 12k", // across into the partial last block
		"write -P 0x55 1028k 4k",  // the very last sector run
	}
	reads := []string{
		"read -P 0x11 0 60k",
		"read -P 0x22 60k 8k",
		"read -P 0x11 68k 0",
		"read -P 0 68k 52k",
		"read -P 0x33 120k 200k",
		"read -P 0 320k 700k",
		"read -P 0x44 1020k 8k",
		"read -P 0x55 1028k 4k",
	}
	qemuIO(t, url, writes...)
	qemuIO(t, url, reads...)
	n.stop()
	n.start()
	qemuIO(t, url, reads...)
}

func TestKill9AfterFUAAndFlush(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "crash", "--size", "8M", "--block-size", "1M")
	url := n.url("crash")
	// A write with FUA, then kill -9 at once.
	qemuIO(t, url, "write -f -P 0xa1 1536k 1M")
	n.kill9()
	n.start()
	qemuIO(t, url, "read -P 0xa1 1536k 1M")
	// Plain writes followed by SYNCHRONIZE CACHE, then kill -9.
	qemuIO(t, url, "write -P 0xb2 0 3M", "write -P 0xc3 5M 3M", "flush")
	n.kill9()
	n.start()
	qemuIO(t, url, "read -P 0xb2 0 3M", "read -P 0xc3 5M 3M", "read -P 0xa1 3M 0")
}

func TestSeveralSessionsOnOneLUN(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "shared", "--size", "64M")
	url := n.url("shared")
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := i * 16
			pat := 0x10 + i
			out, err := run(t, 2*time.Minute, "qemu-io", "-f", "raw",
				"-c", fmt.Sprintf("write -P %d %dM 16M", pat, off),
				"-c", fmt.Sprintf("read -P %d %dM 16M", pat, off), url)
			if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "verification") {
				errs <- fmt.Sprintf("session %d: %v\n%s", i, err, out)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	// What each session wrote is visible through a new one.
	qemuIO(t, url, "read -P 16 0 16M", "read -P 17 16M 16M", "read -P 18 32M 16M", "read -P 19 48M 16M")
}

func TestLargeTransfersAtDepthAndAbruptDisconnect(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "big", "--size", "256M")
	url := n.url("big")
	for range 3 {
		out, err := run(t, 3*time.Minute, "qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "4M", "-d", "16", "-c", "200", url)
		if err != nil || !strings.Contains(out, "Run completed") {
			t.Fatalf("4 MiB writes at depth 16: %v\n%s", err, out)
		}
	}
	out, err := run(t, 3*time.Minute, "qemu-img", "bench", "-f", "raw", "-t", "none", "-s", "4M", "-d", "16", "-c", "200", url)
	if err != nil || !strings.Contains(out, "Run completed") {
		t.Fatalf("4 MiB reads at depth 16: %v\n%s", err, out)
	}
	// An initiator killed in the middle of large writes.
	for range 3 {
		cmd := exec.Command("qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "4M", "-d", "16", "-c", "100000", url)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 20*time.Second, "a session to appear", func() bool {
			return strings.Contains(n.mustCLI("node", "info", "-o", "json"), "\"initiator\"")
		})
		cmd.Process.Kill()
		cmd.Wait()
	}
	// The sessions go away and the target still serves.
	waitFor(t, 20*time.Second, "the killed sessions to end", func() bool {
		return !strings.Contains(n.mustCLI("node", "info", "-o", "json"), "\"initiator\"")
	})
	qemuIO(t, url, "write -P 0x5a 0 4M", "read -P 0x5a 0 4M")
}

func TestMalformedPDUsDoNotHurt(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "robust", "--size", "4M")
	garbage := [][]byte{
		make([]byte, 48), // an all-zero BHS (NOP-Out before login)
		append([]byte{0x43, 0x87}, make([]byte, 46)...),                               // login with no data
		append([]byte{0x01, 0x80, 0, 0, 0xff, 0xff, 0xff, 0xff}, make([]byte, 40)...), // SCSI command before login, huge lengths
		[]byte("GET / HTTP/1.0\r\n\r\n"),
	}
	hdr := make([]byte, 48)
	hdr[0] = 0x43
	hdr[1] = 0x87
	hdr[5], hdr[6], hdr[7] = 0xff, 0xff, 0xff // 16 MiB data segment claimed
	garbage = append(garbage, hdr)
	for i, g := range garbage {
		c, err := net.DialTimeout("tcp", n.portal, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(g)
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		c.Read(buf) // a reject/login failure or a close; either is fine
		c.Close()
		if out, err := run(t, 30*time.Second, "iscsi-inq", n.url("robust")); err != nil {
			t.Fatalf("after garbage %d the target no longer serves: %v\n%s\n%s", i, err, out, n.logs)
		}
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	dir := t.TempDir()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	base := func(extra string) string {
		return fmt.Sprintf("node:\n  name: n1\n  data_dir: %s\napi:\n  listen: 127.0.0.1:%d\niscsi:\n  listen: 127.0.0.1:%d\n%s", dir, freePort(t), freePort(t), extra)
	}
	cases := []struct {
		name, cfg, want string
		env             []string
	}{
		{"unknown key", base("bogus:\n  key: 1\n"), "unknown key(s) bogus.key", nil},
		{"bad address", strings.Replace(base(""), "listen: 127.0.0.1", "listen: nowhere", 1), "api.listen", nil},
		{"missing dir", strings.Replace(base(""), dir, dir+"/missing", 1), "node.data_dir", nil},
		{"bad backend", base("metadata:\n  backend: etcd\n"), "metadata.backend", nil},
		{"bad iqn", base(""), "iscsi.iqn_prefix", []string{"UKAI_ISCSI_IQN_PREFIX=not-an-iqn"}},
		{"port clash", strings.Replace(base(""), "iscsi:\n  listen: 127.0.0.1:", "iscsi:\n  listen: "+busy.Addr().String()+"\n  #", 1), "address already in use", nil},
		// Beyond loopback without protection: refused before anything
		// listens (the wildcard is never bound).
		{"api without token", strings.Replace(base(""), "api:\n  listen: 127.0.0.1:", "api:\n  listen: 0.0.0.0:", 1), "api.token_file", nil},
		{"peer without tls", base(""), "tls.ca, tls.cert and tls.key", []string{fmt.Sprintf("UKAI_PEER_LISTEN=0.0.0.0:%d", freePort(t))}},
		{"gossip without key", base(""), "gossip.secret_key", []string{fmt.Sprintf("UKAI_GOSSIP_BIND=0.0.0.0:%d", freePort(t))}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			os.WriteFile(p, []byte(c.cfg), 0o600)
			cmd := exec.Command(ukaiBin, "serve", "--config", p)
			cmd.Env = append(os.Environ(), c.env...)
			out, err := runWithTimeout(cmd, 20*time.Second)
			if err == nil || !strings.Contains(out, c.want) {
				t.Fatalf("want a failure mentioning %q, got %v:\n%s", c.want, err, out)
			}
		})
	}
}

func TestBindsExactlyTheConfiguredAddress(t *testing.T) {
	n := newNode(t, "n1")
	// Environment beats the file, flags beat the environment.
	envPortal := fmt.Sprintf("127.0.0.3:%d", freePort(t))
	flagAPI := fmt.Sprintf("127.0.0.2:%d", freePort(t))
	n.portal = envPortal
	cmd := exec.Command(ukaiBin, "serve", "--config", n.cfgPath, "--api.listen", flagAPI)
	cmd.Env = append(os.Environ(), "UKAI_ISCSI_LISTEN="+envPortal, "UKAI_API_LISTEN=127.0.0.4:1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	n.api = flagAPI
	waitFor(t, 20*time.Second, "the API on the flag's address", func() bool {
		_, _, err := n.cli("version")
		return err == nil && strings.Contains(must(n.cli("node", "info", "-o", "json")), envPortal)
	})
	// The portal listens on 127.0.0.3 only: the same port on 127.0.0.1 is free.
	_, port, _ := net.SplitHostPort(envPortal)
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 2*time.Second); err == nil {
		c.Close()
		t.Fatalf("the portal configured on %s also accepts on 127.0.0.1", envPortal)
	}
	if l, err := net.Listen("tcp", "127.0.0.1:"+port); err != nil {
		t.Fatalf("port %s on 127.0.0.1 is taken: the portal bound more than its address: %v", port, err)
	} else {
		l.Close()
	}
}

func must(s, _ string, _ error) string { return s }

func runWithTimeout(cmd *exec.Cmd, d time.Duration) (string, error) {
	var b strings.Builder
	cmd.Stdout, cmd.Stderr = &b, &b
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return b.String(), err
	case <-time.After(d):
		cmd.Process.Kill()
		<-done
		return b.String(), fmt.Errorf("still running after %v", d)
	}
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// allocated returns the bytes the node's only image file occupies on disk.
func allocated(t *testing.T, n *node) int64 {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(n.dir, "data", "images", "*.img"))
	if len(files) != 1 {
		t.Fatalf("image files: %v", files)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(files[0], &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestThinAndUnmapReleasesSpace(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "thin", "--size", "1G")
	if a := allocated(t, n); a > 1<<20 {
		t.Fatalf("a new 1 GiB image occupies %d bytes: not thin", a)
	}
	url := n.url("thin")
	qemuIO(t, url, "write -P 0x77 0 32M", "flush")
	full := allocated(t, n)
	if full < 32<<20 {
		t.Fatalf("after writing 32 MiB the file occupies %d bytes", full)
	}
	// qemu-io's discard becomes UNMAP (the LUN advertises it in VPD B2).
	qemuIO(t, url, "discard 0 16M", "flush")
	after := allocated(t, n)
	if full-after < 16<<20-64<<10 { // the file system may keep a page of metadata
		t.Fatalf("UNMAP of 16 MiB released %d bytes (%d -> %d)", full-after, full, after)
	}
	qemuIO(t, url, "read -P 0 0 16M", "read -P 0x77 16M 16M")
	// Write zeroes with unmap (WRITE SAME(16) with UNMAP) also releases.
	qemuIO(t, url, "write -z -u 16M 8M", "flush")
	if a := allocated(t, n); after-a < 8<<20-64<<10 {
		t.Fatalf("write zeroes with unmap released %d bytes", after-a)
	}
	qemuIO(t, url, "read -P 0 0 24M", "read -P 0x77 24M 8M")
}

func TestSIGTERMWithActiveSessionsStopsCleanly(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "busy", "--size", "128M")
	url := n.url("busy")
	qemuIO(t, url, "write -P 0x3c 0 8M", "flush")
	load := exec.Command("qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-s", "64k", "-d", "8", "-o", "16M", "-c", "10000000", url)
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { load.Process.Kill(); load.Wait() }()
	waitFor(t, 20*time.Second, "the writer's session", func() bool {
		return strings.Contains(n.mustCLI("node", "info", "-o", "json"), "\"initiator\"")
	})
	start := time.Now()
	n.stop() // requires exit status 0
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("stop took %v", d)
	}
	n.start()
	qemuIO(t, url, "read -P 0x3c 0 8M")
}
