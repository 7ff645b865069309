package chaos

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/integration/chaos/check"
)

// cellSize is the unit the clients write and read: one register of the
// history. Images have 64 KiB blocks, so sixteen cells share a block and
// writes to neighbouring cells race with each other's syncs and records.
const cellSize = 4096

var cellMagic = [8]byte{'U', 'K', 'A', 'I', 'C', 'H', 'A', 'O'}

// encodeCell is the content of one write: magic, the unique value, the
// cell's own coordinates (a write landing at the wrong offset decodes as
// unknown) and a filler derived from all three (a torn or mixed cell
// decodes as unknown).
func encodeCell(image, cell int, value uint64) []byte {
	b := make([]byte, cellSize)
	copy(b, cellMagic[:])
	binary.BigEndian.PutUint64(b[8:], value)
	binary.BigEndian.PutUint32(b[16:], uint32(image))
	binary.BigEndian.PutUint32(b[20:], uint32(cell))
	x := value ^ uint64(image)<<48 ^ uint64(cell)<<16
	for i := 24; i < cellSize; i += 8 {
		x += 0x9e3779b97f4a7c15 // splitmix64
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		binary.BigEndian.PutUint64(b[i:], z^z>>31)
	}
	return b
}

// decodeCell returns the value a cell holds: 0 for zeros, ok=false for
// bytes no write of this cell produced.
func decodeCell(b []byte, image, cell int) (value uint64, ok bool) {
	if len(b) != cellSize {
		return 0, false
	}
	if !bytes.Equal(b[:8], cellMagic[:]) {
		for _, c := range b {
			if c != 0 {
				return 0, false
			}
		}
		return 0, true
	}
	v := binary.BigEndian.Uint64(b[8:])
	if v == 0 || !bytes.Equal(b, encodeCell(image, cell, v)) {
		return v, false
	}
	return v, true
}

// history records operations from many goroutines.
type history struct {
	t0  time.Time
	mu  sync.Mutex
	ops []check.Op
}

func (h *history) since(t time.Time) time.Duration { return t.Sub(h.t0) }

func (h *history) add(op check.Op) {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.ID = len(h.ops)
	h.ops = append(h.ops, op)
}

func (h *history) snapshot() []check.Op {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]check.Op(nil), h.ops...)
}

// session is one qemu-io process logged in to one image through one
// node's portal (libiscsi, the initiator QEMU uses), driven line by line.
type session struct {
	node  *ukaiNode
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
}

// openSession starts qemu-io and waits until the image is open (the answer
// to `length`), so that a failed login is not mistaken for a failed op.
func openSession(ctx context.Context, n *ukaiNode, image string, timeout time.Duration) (*session, error) {
	url := fmt.Sprintf("iscsi://%s/%s:%s/0", n.portal, iqnPrefix, image)
	// stdbuf: qemu-io's stdout is a pipe, and each answer must arrive
	// when it is printed, not when the buffer fills.
	cmd := exec.Command("stdbuf", "-oL", "qemu-io", "-f", "raw", url)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu-io: %w", err)
	}
	s := &session{node: n, cmd: cmd, stdin: stdin, lines: make(chan string, 4096)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
		_ = cmd.Wait()
	}()
	if _, err := io.WriteString(stdin, "length\n"); err != nil {
		s.close()
		return nil, err
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case line, ok := <-s.lines:
			if !ok {
				return nil, fmt.Errorf("qemu-io %s exited before opening", url)
			}
			line = strings.TrimLeft(strings.ReplaceAll(line, "qemu-io> ", ""), " ")
			if strings.HasSuffix(line, "iB") || strings.HasSuffix(line, "bytes") {
				return s, nil
			}
		case <-timer.C:
			s.close()
			return nil, fmt.Errorf("qemu-io %s: not open after %v", url, timeout)
		case <-ctx.Done():
			s.close()
			return nil, ctx.Err()
		}
	}
}

func (s *session) close() {
	_ = s.stdin.Close()
	_ = s.cmd.Process.Kill()
	for range s.lines {
	}
}

// do sends one command and collects its answer: the hexdump lines of a
// read, the line naming the bytes done ("wrote 4096/4096 bytes at offset
// N", "read ..."), then the statistics line that ends a successful
// command; or "read failed: ..." / "write failed: ...", which ends a
// failed one (libiscsi's own "iSCSI ... failed at lba" line before it is
// only a detail). An answer that does not name this command's offset and
// length means the session lost track of its commands: indeterminate,
// like no answer in time or qemu-io exiting.
func (s *session) do(line, done string, timeout time.Duration) (dump []string, res check.Result, errText string) {
	if _, err := io.WriteString(s.stdin, line+"\n"); err != nil {
		return nil, check.Timeout, err.Error()
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	matched := false
	var detail string
	for {
		select {
		case l, ok := <-s.lines:
			if !ok {
				return nil, check.Timeout, "qemu-io exited " + detail
			}
			l = strings.TrimLeft(strings.ReplaceAll(l, "qemu-io> ", ""), " ")
			switch {
			case strings.HasPrefix(l, "read failed: "), strings.HasPrefix(l, "write failed: "):
				return nil, check.Failed, strings.TrimSpace(detail + " " + l)
			case strings.HasPrefix(l, "wrote "), strings.HasPrefix(l, "read "):
				if l != done {
					return nil, check.Timeout, fmt.Sprintf("out of step: %q answered %q", line, l)
				}
				matched = true
			case strings.Contains(l, " ops; "):
				if !matched {
					return nil, check.Timeout, fmt.Sprintf("out of step: %q answered statistics without %q", line, done)
				}
				return dump, check.OK, ""
			case len(l) > 10 && l[8] == ':' && !matched:
				dump = append(dump, l)
			default:
				detail = l
			}
		case <-timer.C:
			return nil, check.Timeout, "no answer in " + timeout.String()
		}
	}
}

// parseDump turns qemu-io's `read -v` hexdump into bytes.
func parseDump(dump []string, base int64, n int) ([]byte, error) {
	b := make([]byte, n)
	seen := 0
	for _, l := range dump {
		off, err := strconv.ParseInt(l[:8], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("hexdump line %q: %w", l, err)
		}
		fields := strings.Fields(l[9:])
		if len(fields) < 16 {
			return nil, fmt.Errorf("hexdump line %q: short", l)
		}
		raw, err := hex.DecodeString(strings.Join(fields[:16], ""))
		if err != nil {
			return nil, fmt.Errorf("hexdump line %q: %w", l, err)
		}
		rel := off - base
		if rel < 0 || rel+16 > int64(n) {
			return nil, fmt.Errorf("hexdump offset %#x outside the read", off)
		}
		copy(b[rel:], raw)
		seen += 16
	}
	if seen != n {
		return nil, fmt.Errorf("hexdump has %d of %d bytes", seen, n)
	}
	return b, nil
}

// workload is what the clients do.
type workload struct {
	images    []imageSpec
	cells     int           // cells per image the clients use
	hot       int           // a hot set of cells, spread over every block
	opTimeout time.Duration // an op without an answer by then is indeterminate
	think     time.Duration // at most this pause between two ops
}

type imageSpec struct {
	name   string
	index  int
	copies []string
}

// client is one initiator: it writes and reads cells of one image through
// a session on a random node, moving to another node now and then (as a
// VM migrates) and whenever its session fails.
type client struct {
	id      int
	name    string
	img     imageSpec
	w       workload
	c       *cluster
	h       *history
	rng     *rand.Rand
	src     string // qemu-io reads a write's bytes from this file
	n       int    // writes so far
	failing int    // failed ops in a row
	logf    func(format string, args ...any)
}

func (cl *client) run(ctx context.Context) {
	var s *session
	left := 0
	defer func() {
		if s != nil {
			s.close()
		}
	}()
	for ctx.Err() == nil {
		if s == nil {
			n := cl.c.nodes[cl.rng.IntN(len(cl.c.nodes))]
			var err error
			if s, err = openSession(ctx, n, cl.img.name, cl.w.opTimeout); err != nil {
				s = nil
				sleep(ctx, 300*time.Millisecond)
				continue
			}
			left = 20 + cl.rng.IntN(80)
		}
		res := cl.one(s)
		left--
		if res == check.Timeout || left <= 0 {
			s.close()
			s = nil
		}
		if cl.w.think > 0 {
			sleep(ctx, time.Duration(cl.rng.Int64N(int64(cl.w.think))))
		}
	}
}

func (cl *client) pickCell() int {
	if cl.rng.IntN(10) < 7 {
		// The hot set: evenly spread, so every block has hot cells.
		return cl.rng.IntN(cl.w.hot) * (cl.w.cells / cl.w.hot)
	}
	return cl.rng.IntN(cl.w.cells)
}

// one issues one read or write and records it.
func (cl *client) one(s *session) check.Result {
	cell := cl.pickCell()
	off := int64(cell) * cellSize
	op := check.Op{Client: cl.name, Key: fmt.Sprintf("%s/%d", cl.img.name, cell)}
	var line, done string
	if cl.rng.IntN(2) == 0 {
		cl.n++
		op.Kind, op.Value = check.Write, uint64(cl.id)<<32|uint64(cl.n)
		if err := os.WriteFile(cl.src, encodeCell(cl.img.index, cell, op.Value), 0o600); err != nil {
			panic(err)
		}
		line = fmt.Sprintf("write -s %s %d %d", cl.src, off, cellSize)
		done = fmt.Sprintf("wrote %d/%d bytes at offset %d", cellSize, cellSize, off)
	} else {
		op.Kind = check.Read
		line = fmt.Sprintf("read -v %d %d", off, cellSize)
		done = fmt.Sprintf("read %d/%d bytes at offset %d", cellSize, cellSize, off)
	}
	start := time.Now()
	dump, res, errText := s.do(line, done, cl.w.opTimeout)
	end := time.Now()
	op.Start, op.End, op.Result = cl.h.since(start), cl.h.since(end), res
	if op.Kind == check.Read && res == check.OK {
		b, err := parseDump(dump, off, cellSize)
		if err != nil {
			op.Unknown = true
			cl.logf("%s: %v", op.Key, err)
		} else {
			v, ok := decodeCell(b, cl.img.index, cell)
			op.Value, op.Unknown = v, !ok
		}
	}
	// Log the start and the end of a run of failures, not every one.
	switch {
	case res != check.OK && cl.failing == 0:
		cl.logf("%s via %s: %v %s %v: %s", cl.name, s.node.name, op.Kind, op.Key, res, errText)
		cl.failing++
	case res != check.OK:
		cl.failing++
	case cl.failing > 0:
		cl.logf("%s via %s: ok again after %d failed ops", cl.name, s.node.name, cl.failing)
		cl.failing = 0
	}
	cl.h.add(op)
	return res
}

// finalRead reads every cell of an image through one session and records
// one op per cell, marked "final" for the checker.
func finalRead(ctx context.Context, c *cluster, h *history, img imageSpec, cells int, via *ukaiNode) error {
	s, err := openSession(ctx, via, img.name, 30*time.Second)
	if err != nil {
		return err
	}
	defer s.close()
	start := time.Now()
	n := cells * cellSize
	dump, res, errText := s.do(fmt.Sprintf("read -v 0 %d", n), fmt.Sprintf("read %d/%d bytes at offset 0", n, n), 2*time.Minute)
	end := time.Now()
	if res != check.OK {
		return fmt.Errorf("final read of %s through %s: %s", img.name, via.name, errText)
	}
	b, err := parseDump(dump, 0, n)
	if err != nil {
		return fmt.Errorf("final read of %s: %w", img.name, err)
	}
	for cell := 0; cell < cells; cell++ {
		v, ok := decodeCell(b[cell*cellSize:(cell+1)*cellSize], img.index, cell)
		h.add(check.Op{Client: "final", Kind: check.Read, Key: fmt.Sprintf("%s/%d", img.name, cell),
			Value: v, Unknown: !ok, Start: h.since(start), End: h.since(end), Result: check.OK})
	}
	return nil
}

// copyFile is where a node keeps its copy of an image.
func copyFile(n *ukaiNode, id string) string {
	return filepath.Join(n.dir, "data", "images", id+".img")
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
