package cli

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"
)

// progress reports a long operation: on a terminal a bar redrawn in place
// (at most 10 times a second); elsewhere a plain line every plainEvery, so
// logs of scripted runs stay readable.
type progress struct {
	w     io.Writer
	tty   bool
	what  string
	unit  string // "bytes" prints sizes; anything else counts
	total int64
	start time.Time
	drawn time.Time
	done  atomic.Int64
}

const plainEvery = 10 * time.Second

func newProgress(w io.Writer, what, unit string, total int64) *progress {
	return &progress{w: w, tty: isTerminal(w), what: what, unit: unit, total: total, start: time.Now()}
}

// add counts n more done and redraws when it is time.
func (p *progress) add(n int64) { p.set(p.done.Add(n)) }

// set records done and redraws when it is time.
func (p *progress) set(done int64) {
	p.done.Store(done)
	now := time.Now()
	every := plainEvery
	if p.tty {
		every = 100 * time.Millisecond
	}
	if now.Sub(p.drawn) < every {
		return
	}
	p.drawn = now
	p.draw(done, false)
}

// finish draws the last state (ending a bar's line); without a terminal
// only when a line was printed before, so a quick operation prints none.
func (p *progress) finish() {
	if p.tty || !p.drawn.IsZero() {
		p.draw(p.done.Load(), true)
	}
}

func (p *progress) amount(n int64) string {
	if p.unit == "bytes" {
		return FormatSize(n)
	}
	return fmt.Sprintf("%d %s", n, p.unit)
}

func (p *progress) draw(done int64, last bool) {
	el := time.Since(p.start)
	rate := float64(done) / max(el.Seconds(), 1e-3)
	eta := "-"
	if done > 0 && done < p.total {
		eta = (time.Duration(float64(p.total-done) / rate * float64(time.Second))).Round(time.Second).String()
	}
	rateS := fmt.Sprintf("%.0f/s", rate)
	if p.unit == "bytes" {
		rateS = FormatSize(int64(rate)) + "/s"
	}
	if !p.tty {
		fmt.Fprintf(p.w, "%s: %s of %s, %s, ETA %s\n", p.what, p.amount(done), p.amount(p.total), rateS, eta)
		return
	}
	fmt.Fprintf(p.w, "\r%s %s %s/%s  %s  ETA %s   ", p.what, bar(done, p.total), p.amount(done), p.amount(p.total), rateS, eta)
	if last {
		fmt.Fprintln(p.w)
	}
}

// bar draws done of total as [#####.....].
func bar(done, total int64) string {
	const width = 30
	frac := 1.0
	if total > 0 {
		frac = min(max(float64(done)/float64(total), 0), 1)
	}
	filled := int(frac * width)
	return "[" + strings.Repeat("#", filled) + strings.Repeat(".", width-filled) + "]"
}

// countingReader counts what is read through it.
type countingReader struct {
	r io.Reader
	p *progress
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.p.add(int64(n))
	return n, err
}

// countingWriter counts what is written through it.
type countingWriter struct {
	w io.Writer
	p *progress
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	if c.p != nil {
		c.p.add(int64(n))
	}
	return n, err
}
