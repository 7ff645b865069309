package node

import (
	"context"
	"fmt"
	"io"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/target/scsi"
)

// dataChunk is how much image data one step of a stream moves.
const dataChunk = 4 << 20

// ReadData implements api.Service: an image is read through its owner
// (this node takes ownership, or forwards to the owner, like iSCSI I/O);
// a snapshot is read on its origin's owner.
func (n *Node) ReadData(ctx context.Context, name string, start func(int64), w io.Writer) error {
	if err := meta.ValidateRecordName(name); err != nil {
		return err
	}
	if rec, err := n.lookupRecord(ctx, name); err == nil {
		name = rec.Name // a snapshot named before per-image names
	}
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return err
	}
	img := s.Record()
	read := func(p []byte, off int64) error { return n.router.Backend(s).ReadAt(ctx, p, off) }
	if img.IsSnapshot() {
		if c, err := n.remoteOwner(ctx, img.Origin.Name); err != nil {
			return err
		} else if c != nil {
			return c.ReadData(ctx, name, start, w)
		}
		origin, done, err := n.ownOrigin(ctx, img.Origin.Name)
		if err != nil {
			return err
		}
		defer done()
		if !origin.Record().HasSnapshot(img.ID) {
			return fmt.Errorf("%w: snapshot %s is no longer listed by %s", meta.ErrImageNotFound, name, img.Origin.Name)
		}
		snapDone, err := n.ownSnapshot(ctx, s)
		if err != nil {
			return err
		}
		defer snapDone()
		read = func(p []byte, off int64) error { return n.readSnapshot(ctx, origin, s, p, off) }
	} else {
		s.BeginBusy()
		defer s.EndBusy()
	}
	start(img.Size)
	buf := make([]byte, min(dataChunk, img.Size))
	for off := int64(0); off < img.Size; off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), img.Size-off)]
		if err := read(p, off); err != nil {
			return fmt.Errorf("read %s at %d: %w", name, off, err)
		}
		if _, err := w.Write(p); err != nil {
			return fmt.Errorf("send %s at %d: %w", name, off, err)
		}
	}
	return nil
}

// WriteData implements api.Service: r is written from the image's start
// through its owner; chunks of zeros are unmapped instead (the image stays
// thin and reads them as zeros), and the copies are flushed at the end.
// Data beyond the image's size is refused.
func (n *Node) WriteData(ctx context.Context, name string, r io.Reader) (int64, error) {
	s, err := n.servedByName(ctx, name)
	if err != nil {
		return 0, err
	}
	img := s.Record()
	if img.IsSnapshot() {
		return 0, fmt.Errorf("%w: %q is a snapshot: snapshots are read-only", meta.ErrInvalid, name)
	}
	s.BeginBusy()
	defer s.EndBusy()
	g := n.router.Backend(s)
	size := s.Vol.Size()
	buf := make([]byte, dataChunk)
	var done int64
	src := &endReader{r: r}
	for {
		k, rerr := io.ReadFull(src, buf)
		if k > 0 {
			if done+int64(k) > size {
				return done, fmt.Errorf("%w: the data is longer than the image (%s)", meta.ErrInvalid, meta.FormatSize(size))
			}
			p := buf[:k]
			if scsi.AllZero(p) && k%meta.SectorSize == 0 {
				err = g.Unmap(ctx, done, int64(k))
			} else {
				err = g.WriteAt(ctx, p, done, false)
			}
			if err != nil {
				return done, fmt.Errorf("write %s at %d: %w", name, done, err)
			}
			done += int64(k)
		}
		if src.clean {
			break // the data ended where its sender ended it
		}
		if rerr != nil {
			return done, fmt.Errorf("read the data: %w", rerr)
		}
	}
	if err := g.Flush(ctx); err != nil {
		return done, fmt.Errorf("flush %s: %w", name, err)
	}
	return done, nil
}

// endReader tells a clean end of the data (io.EOF from the source) from a
// cut (any other error, io.ErrUnexpectedEOF from a body cut short
// included), which io.ReadFull would report alike.
type endReader struct {
	r     io.Reader
	clean bool
}

func (e *endReader) Read(p []byte) (int, error) {
	k, err := e.r.Read(p)
	if err == io.EOF {
		e.clean = true
	}
	return k, err
}
