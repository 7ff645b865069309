package cli

import "testing"

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
