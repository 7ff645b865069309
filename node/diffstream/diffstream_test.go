package diffstream

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// A stream written and read back gives the same records; every cut and
// every corrupted byte of it is an error, never a different set of
// records read as complete.
func TestRoundTripAndDamage(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 21))
	for round := range 50 {
		size := int64(1+rng.IntN(64)) << 16
		type rec struct {
			kind     byte
			off, len int64
			data     []byte
		}
		var want []rec
		var buf bytes.Buffer
		w, err := NewWriter(&buf, []string{"", "s1"}[round%2], "s2", size)
		if err != nil {
			t.Fatal(err)
		}
		for range rng.IntN(6) {
			off := rng.Int64N(size)
			n := 1 + rng.Int64N(min(size-off, 4096))
			if rng.IntN(2) == 0 {
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.IntN(256))
				}
				want = append(want, rec{'w', off, n, p})
				err = w.Data(off, p)
			} else {
				want = append(want, rec{'z', off, n, nil})
				err = w.Zero(off, n)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := w.End(); err != nil {
			t.Fatal(err)
		}
		stream := buf.Bytes()
		read := func(b []byte) ([]rec, error) {
			r, err := NewReader(bytes.NewReader(b))
			if err != nil {
				return nil, err
			}
			if r.Size != size || r.To != "s2" {
				t.Fatalf("header read as size %d, to %q", r.Size, r.To)
			}
			var got []rec
			for {
				x, err := r.Next()
				if err == io.EOF {
					return got, nil
				}
				if err != nil {
					return got, err
				}
				g := rec{x.Kind, x.Off, x.Len, nil}
				if x.Kind == 'w' {
					if g.data, err = io.ReadAll(x.Data); err != nil {
						return got, err
					}
				}
				got = append(got, g)
			}
		}
		got, err := read(stream)
		if err != nil || len(got) != len(want) {
			t.Fatalf("round %d: read back %d records (%v), want %d", round, len(got), err, len(want))
		}
		for i := range got {
			if got[i].kind != want[i].kind || got[i].off != want[i].off || got[i].len != want[i].len || !bytes.Equal(got[i].data, want[i].data) {
				t.Fatalf("round %d record %d differs", round, i)
			}
		}
		cuts := []int{len(stream) - 1}
		for range 40 {
			cuts = append(cuts, rng.IntN(len(stream)))
		}
		for _, cut := range cuts {
			if _, err := read(stream[:cut]); !errors.Is(err, ErrMalformed) {
				t.Fatalf("round %d: the stream cut at %d of %d read without an error: %v", round, cut, len(stream), err)
			}
		}
	}
}

func TestWriterRefusesRangesOutsideTheImage(t *testing.T) {
	w, err := NewWriter(io.Discard, "", "", 4096)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{4096, 1}, {-1, 2}, {4000, 97}, {0, 0}} {
		if err := w.Zero(r[0], r[1]); !errors.Is(err, ErrMalformed) {
			t.Fatalf("zero %v: %v", r, err)
		}
	}
}

func TestReaderRefusesLies(t *testing.T) {
	for name, s := range map[string]string{
		"no header":        "hello",
		"record too big":   Header + "s\x00\x10\x00\x00\x00\x00\x00\x00" + "z\x00\x00\x00\x00\x00\x00\x00\x00\x01\x10\x00\x00\x00\x00\x00\x00",
		"data before size": Header + "w\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00x",
		"unknown record":   Header + "s\x00\x10\x00\x00\x00\x00\x00\x00" + "q",
		"huge name":        Header + "f\xff\xff\xff\xff",
	} {
		r, err := NewReader(bytes.NewReader([]byte(s)))
		if err == nil {
			_, err = r.Next()
		}
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
