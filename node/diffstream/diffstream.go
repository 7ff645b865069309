// Package diffstream reads and writes the stream of `ukai image
// export-diff` and `import-diff`: the changes between two snapshots of an
// image, or (without a first snapshot) a snapshot's data. It is rbd's
// export-diff format, version 1, so that the tools of either side can
// read the other's (docs/images.md):
//
//	"rbd diff v1\n"
//	'f' <le32 length> <name>        optional: the snapshot the diff starts from
//	't' <le32 length> <name>        optional: the snapshot it leads to
//	's' <le64 size>                 the image's size at the end
//	'w' <le64 offset> <le64 length> <data>   data to write
//	'z' <le64 offset> <le64 length>          a range that reads as zeros
//	'e'                             the end
//
// 'w' and 'z' records come after 's', each inside the size. A stream
// without its 'e' was cut short: the Reader says so.
package diffstream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Header opens every stream.
const Header = "rbd diff v1\n"

// MaxName bounds a snapshot name in a stream.
const MaxName = 4096

// ErrMalformed: the stream is not a diff, or breaks its rules.
var ErrMalformed = errors.New("malformed diff stream")

// Writer writes a stream.
type Writer struct {
	w    *bufio.Writer
	size int64
	err  error
}

// NewWriter writes the header and the from, to (each left out when empty)
// and size records.
func NewWriter(w io.Writer, from, to string, size int64) (*Writer, error) {
	d := &Writer{w: bufio.NewWriterSize(w, 1<<20), size: size}
	d.w.WriteString(Header)
	for _, r := range []struct {
		tag  byte
		name string
	}{{'f', from}, {'t', to}} {
		if r.name == "" {
			continue
		}
		if len(r.name) > MaxName {
			return nil, fmt.Errorf("%w: snapshot name of %d bytes", ErrMalformed, len(r.name))
		}
		d.w.WriteByte(r.tag)
		d.le32(uint32(len(r.name)))
		d.w.WriteString(r.name)
	}
	d.w.WriteByte('s')
	d.le64(uint64(size))
	return d, d.flushErr()
}

func (d *Writer) le32(v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.w.Write(b[:])
}

func (d *Writer) le64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	d.w.Write(b[:])
}

func (d *Writer) flushErr() error {
	if d.err == nil && d.w.Buffered() >= 1<<20 {
		d.err = d.w.Flush()
	}
	return d.err
}

func (d *Writer) check(off, n int64) error {
	if off < 0 || n <= 0 || off > d.size-n {
		return fmt.Errorf("%w: range %d+%d outside the image's %d bytes", ErrMalformed, off, n, d.size)
	}
	return nil
}

// Data writes a 'w' record.
func (d *Writer) Data(off int64, p []byte) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	d.w.WriteByte('w')
	d.le64(uint64(off))
	d.le64(uint64(len(p)))
	if _, err := d.w.Write(p); err != nil {
		d.err = err
	}
	return d.flushErr()
}

// DataFrom writes a 'w' record of n bytes read from r.
func (d *Writer) DataFrom(off, n int64, r io.Reader) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	d.w.WriteByte('w')
	d.le64(uint64(off))
	d.le64(uint64(n))
	if _, err := io.CopyN(d.w, r, n); err != nil {
		d.err = err
	}
	return d.flushErr()
}

// Zero writes a 'z' record.
func (d *Writer) Zero(off, n int64) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	d.w.WriteByte('z')
	d.le64(uint64(off))
	d.le64(uint64(n))
	return d.flushErr()
}

// End writes the 'e' record and flushes.
func (d *Writer) End() error {
	if d.err != nil {
		return d.err
	}
	d.w.WriteByte('e')
	return d.w.Flush()
}

// Record is one 'w' or 'z' record; Data reads a 'w' record's bytes (all
// of them before the next call to Next).
type Record struct {
	Kind byte // 'w' or 'z'
	Off  int64
	Len  int64
	Data io.Reader
}

// Reader reads a stream.
type Reader struct {
	r        *bufio.Reader
	From, To string
	Size     int64
	pending  *io.LimitedReader
	ended    bool
	records  int
}

// NewReader reads the header and the records up to the size.
func NewReader(r io.Reader) (*Reader, error) {
	d := &Reader{r: bufio.NewReaderSize(r, 256<<10)}
	h := make([]byte, len(Header))
	if _, err := io.ReadFull(d.r, h); err != nil || string(h) != Header {
		return nil, fmt.Errorf("%w: not a diff (it does not start with %q)", ErrMalformed, Header[:len(Header)-1])
	}
	for {
		tag, err := d.r.ReadByte()
		if err != nil {
			return nil, d.cut(err)
		}
		switch tag {
		case 'f', 't':
			var n uint32
			if err := binary.Read(d.r, binary.LittleEndian, &n); err != nil {
				return nil, d.cut(err)
			}
			if n == 0 || n > MaxName {
				return nil, fmt.Errorf("%w: snapshot name of %d bytes", ErrMalformed, n)
			}
			b := make([]byte, n)
			if _, err := io.ReadFull(d.r, b); err != nil {
				return nil, d.cut(err)
			}
			if tag == 'f' {
				d.From = string(b)
			} else {
				d.To = string(b)
			}
		case 's':
			var n uint64
			if err := binary.Read(d.r, binary.LittleEndian, &n); err != nil {
				return nil, d.cut(err)
			}
			if n == 0 || n > 1<<62 {
				return nil, fmt.Errorf("%w: image size %d", ErrMalformed, n)
			}
			d.Size = int64(n)
			return d, nil
		default:
			return nil, fmt.Errorf("%w: record %q before the image's size", ErrMalformed, tag)
		}
	}
}

func (d *Reader) cut(err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: the stream ends early (after %d records, without its end record)", ErrMalformed, d.records)
	}
	return err
}

// Next returns the next 'w' or 'z' record; io.EOF after the 'e' record.
func (d *Reader) Next() (Record, error) {
	if d.ended {
		return Record{}, io.EOF
	}
	if d.pending != nil {
		// Whatever the caller left of the last record's data.
		if _, err := io.Copy(io.Discard, d.pending); err != nil {
			return Record{}, d.cut(err)
		}
		if d.pending.N > 0 {
			return Record{}, d.cut(io.ErrUnexpectedEOF)
		}
		d.pending = nil
	}
	tag, err := d.r.ReadByte()
	if err != nil {
		return Record{}, d.cut(err)
	}
	switch tag {
	case 'e':
		d.ended = true
		return Record{}, io.EOF
	case 'w', 'z':
	default:
		return Record{}, fmt.Errorf("%w: unknown record %q after %d records", ErrMalformed, tag, d.records)
	}
	var hdr [16]byte
	if _, err := io.ReadFull(d.r, hdr[:]); err != nil {
		return Record{}, d.cut(err)
	}
	off, n := binary.LittleEndian.Uint64(hdr[:8]), binary.LittleEndian.Uint64(hdr[8:])
	if n == 0 || off > uint64(d.Size) || n > uint64(d.Size)-off {
		return Record{}, fmt.Errorf("%w: record %q at %d+%d outside the image's %d bytes", ErrMalformed, tag, off, n, d.Size)
	}
	d.records++
	rec := Record{Kind: tag, Off: int64(off), Len: int64(n)}
	if tag == 'w' {
		d.pending = &io.LimitedReader{R: d.r, N: int64(n)}
		rec.Data = d.pending
	}
	return rec, nil
}
