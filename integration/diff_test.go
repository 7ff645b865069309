package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fileAllocated is the space a file takes on disk.
func fileAllocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestExportDiffRoundTrip: export-diff of a snapshot holds its data and
// no holes; the diff between two snapshots holds only what changed (a
// growth, a range zeroed included); applied with import-diff onto a copy
// of the first snapshot it gives the second byte for byte, holes kept
// holes. Bad streams and bad requests are refused with the reason.
func TestExportDiffRoundTrip(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	dir := t.TempDir()
	n1.mustCLI("image", "create", "src", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("src"), "write -P 0x11 0 8M", "flush")
	n1.mustCLI("snapshot", "create", "src@s1")
	qemuIO(t, n1.url("src"), "write -P 0x22 2M 2M", "write -z 5M 1M", "flush")
	n1.mustCLI("image", "resize", "src", "+4M")
	waitFor(t, 20*time.Second, "n1 to serve the grown LUN", func() bool {
		out, _ := run(t, 30*time.Second, "iscsi-readcapacity16", n1.url("src"))
		return strings.Contains(out, "Total size:20971520")
	})
	qemuIO(t, n1.url("src"), "write -P 0x33 17M 1M", "flush")
	n1.mustCLI("snapshot", "create", "src@s2")
	qemuIO(t, n1.url("src"), "write -P 0x44 0 16M", "flush") // after s2: in no diff

	// The full diff of s1: its 8 MiB of data, not its 8 MiB of holes.
	full := filepath.Join(dir, "full.diff")
	n2.mustCLI("image", "export-diff", "src@s1", full)
	if st, err := os.Stat(full); err != nil || st.Size() < 8<<20 || st.Size() > 8<<20+4096 {
		t.Fatalf("full diff of s1: %v bytes, %v (want 8 MiB and headers)", st.Size(), err)
	}
	// Applied to a smaller image: it grows, and reads as s1.
	n2.mustCLI("image", "create", "restored", "--size", "1M", "--block-size", "1M", "--locations", "n2")
	if out := n2.mustCLI("image", "import-diff", full, "restored"); !strings.Contains(out, "8M written") || !strings.Contains(out, "took snapshot restored@s1") {
		t.Fatalf("import-diff: %s", out)
	}
	qemuIO(t, n2.url("restored"), "read -P 0x11 0 8M", "read -P 0 8M 8M")
	qemuIO(t, n2.url("restored"), "write -P 0x55 12M 1M", "flush") // after restored@s1

	// The diff from s1 to s2: blocks 2-3, the zeroed block 5, the growth.
	inc := filepath.Join(dir, "inc.diff")
	n1.mustCLI("image", "export-diff", "--from-snap", "s1", "src@s2", inc)
	if st, err := os.Stat(inc); err != nil || st.Size() > 4<<20 || st.Size() < 3<<20 {
		t.Fatalf("diff s1..s2: %v bytes, %v (want the 2 MiB and 1 MiB changed, and headers)", st.Size(), err)
	}
	// As rbd: the diff applies where its starting snapshot is. A clone of
	// s1 has no snapshot s1: refused, then applied with --force.
	n1.mustCLI("image", "clone", "src@s1", "copy", "--locations", "n1,n2")
	if _, errOut, err := n1.cli("image", "import-diff", inc, "copy"); err == nil || !strings.Contains(errOut, "copy has no snapshot s1") {
		t.Fatalf("import-diff without its base: %v %s", err, errOut)
	}
	if out := n1.mustCLI("image", "import-diff", "--force", "--no-snapshot", inc, "copy"); !strings.Contains(out, "the changes from s1 to s2") || strings.Contains(out, "took snapshot") {
		t.Fatalf("import-diff: %s", out)
	}
	// restored has s1 (its first import took it): the chain goes on, and
	// restored@s2 is s2.
	if out := n2.mustCLI("image", "import-diff", inc, "restored"); !strings.Contains(out, "took snapshot restored@s2") {
		t.Fatalf("import-diff onto restored: %s", out)
	}
	got, want := filepath.Join(dir, "copy.raw"), filepath.Join(dir, "s2.raw")
	n2.mustCLI("image", "download", "copy", got)
	n2.mustCLI("image", "download", "src@s2", want)
	a, _ := os.ReadFile(got)
	b, _ := os.ReadFile(want)
	if len(a) != 20<<20 || !bytes.Equal(a, b) {
		t.Fatalf("copy of s1 + diff (%d bytes) differs from s2 (%d bytes)", len(a), len(b))
	}
	got2 := filepath.Join(dir, "restored-s2.raw")
	n1.mustCLI("image", "download", "restored@s2", got2)
	// src@s2, but for the block written to restored after restored@s1:
	// a diff leaves alone what did not change between s1 and s2.
	want2 := bytes.Clone(b)
	copy(want2[12<<20:13<<20], bytes.Repeat([]byte{0x55}, 1<<20))
	if a, _ := os.ReadFile(got2); !bytes.Equal(a, want2) {
		t.Fatal("restored@s2 is not src@s2 with restored's own later block")
	}
	if !bytes.Equal(b[5<<20:6<<20], make([]byte, 1<<20)) || !bytes.Equal(b[2<<20:4<<20], bytes.Repeat([]byte{0x22}, 2<<20)) {
		t.Fatal("s2 is not what was written before it")
	}
	if out := n1.mustCLI("image", "verify", "copy"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify copy: %s", out)
	}
	// Holes stay holes: the copy's files hold its data, not 20 MiB.
	var info struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(n1.mustCLI("image", "info", "copy", "-o", "json")), &info); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.nodes {
		// s2 holds 8 MiB of data and 1 MiB of 0x33 (10 MiB with the
		// clone's block of s1 that the diff zeroed).
		if sz := fileAllocated(t, filepath.Join(n.dir, "data", "images", info.ID+".img")); sz > 10<<20 {
			t.Fatalf("%s: the copy takes %d bytes on disk", n.name, sz)
		}
	}

	// Refusals.
	if _, errOut, err := n1.cli("image", "export-diff", "src", filepath.Join(dir, "x")); err == nil || !strings.Contains(errOut, "IMAGE@SNAPSHOT") {
		t.Fatalf("export-diff of an image: %v %s", err, errOut)
	}
	if _, errOut, err := n1.cli("image", "export-diff", "--from-snap", "s2", "src@s1", filepath.Join(dir, "y")); err == nil || !strings.Contains(errOut, "taken after") {
		t.Fatalf("export-diff backwards: %v %s", err, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "y")); err == nil {
		t.Fatal("a failed export-diff left its file")
	}
	garbage := filepath.Join(dir, "garbage")
	os.WriteFile(garbage, []byte("not a diff at all"), 0o600)
	if _, errOut, err := n1.cli("image", "import-diff", garbage, "copy"); err == nil || !strings.Contains(errOut, "not a diff") {
		t.Fatalf("import-diff of garbage: %v %s", err, errOut)
	}
	data, _ := os.ReadFile(inc)
	cut := filepath.Join(dir, "cut.diff")
	os.WriteFile(cut, data[:len(data)-1], 0o600)
	if _, errOut, err := n1.cli("image", "import-diff", "--force", cut, "copy"); err == nil || !strings.Contains(errOut, "ends early") {
		t.Fatalf("import-diff of a cut stream: %v %s", err, errOut)
	}
}
