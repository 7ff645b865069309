package cli

import (
	"bytes"
	"os"
	"syscall"
	"testing"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "64K": 64 << 10, "512M": 512 << 20, "10G": 10 << 30, "2T": 2 << 40,
		"4MiB": 4 << 20, "1gb": 1 << 30, " 8k ": 8 << 10, "0": 0,
	} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1", "1.5G", "10X", "99999999999P", "1 G B"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for in, want := range map[int64]string{
		0: "0", 512: "512", 4 << 20: "4M", 10 << 30: "10G", 1536: "1.5K", 270552342528: "252.0G",
	} {
		if got := FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

// TestSparseWriter: what is written reads back byte for byte, and the zero
// pages are holes.
func TestSparseWriter(t *testing.T) {
	path := t.TempDir() + "/img"
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8<<20)
	copy(want[1<<20:], bytes.Repeat([]byte("data"), 1024)) // one page at 1 MiB
	want[5<<20+17] = 1                                     // one byte in a page at 5 MiB
	w := &sparseWriter{f: f}
	// Odd write sizes, as a stream delivers them.
	for rest := want; len(rest) > 0; {
		n := min(len(rest), 12345)
		if _, err := w.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	if err := w.finish(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back %d bytes (%v), equal %v", len(got), err, bytes.Equal(got, want))
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 256<<10 {
		t.Fatalf("%d bytes allocated for 2 data pages: the zeros were written", used)
	}
}
