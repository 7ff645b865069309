package placement

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

const minutesPerDay = 24 * 60

// ParseWindow parses a daily window "HH:MM-HH:MM" on a 24-hour clock, for
// example "09:30-17:00" or "22:00-06:00" (an end before the start crosses
// midnight). Hours are 0-23 and minutes 00-59; "24:00" is not accepted
// (write "00:00"). A window whose start equals its end is refused: to
// allow syncing at any time, set no windows at all.
func ParseWindow(s string) (Window, error) {
	t := strings.TrimSpace(s)
	a, b, ok := strings.Cut(t, "-")
	if !ok {
		return Window{}, fmt.Errorf("window %q: want HH:MM-HH:MM, e.g. 22:00-06:00", s)
	}
	start, err := parseClock(strings.TrimSpace(a))
	if err != nil {
		return Window{}, fmt.Errorf("window %q: start: %w", s, err)
	}
	end, err := parseClock(strings.TrimSpace(b))
	if err != nil {
		return Window{}, fmt.Errorf("window %q: end: %w", s, err)
	}
	w := Window{Start: start, End: end}
	if err := w.validate(); err != nil {
		return Window{}, fmt.Errorf("window %q: %w", s, err)
	}
	return w, nil
}

// parseClock parses "H:MM" or "HH:MM" into minutes after midnight.
func parseClock(s string) (int, error) {
	h, m, ok := strings.Cut(s, ":")
	if !ok || len(h) < 1 || len(h) > 2 || len(m) != 2 {
		return 0, fmt.Errorf("%q is not HH:MM", s)
	}
	for _, c := range h + m {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%q is not HH:MM", s)
		}
	}
	hh, _ := strconv.Atoi(h)
	mm, _ := strconv.Atoi(m)
	if hh > 23 {
		return 0, fmt.Errorf("hour %d out of range 0-23", hh)
	}
	if mm > 59 {
		return 0, fmt.Errorf("minute %d out of range 00-59", mm)
	}
	return hh*60 + mm, nil
}

func (w Window) validate() error {
	if w.Start < 0 || w.Start >= minutesPerDay {
		return fmt.Errorf("start %d minutes out of range [0,%d)", w.Start, minutesPerDay)
	}
	if w.End < 0 || w.End >= minutesPerDay {
		return fmt.Errorf("end %d minutes out of range [0,%d)", w.End, minutesPerDay)
	}
	if w.Start == w.End {
		return errors.New("start equals end (an empty window); for no restriction set no windows")
	}
	return nil
}

// String formats w as ParseWindow reads it, e.g. "22:00-06:00".
func (w Window) String() string {
	return fmt.Sprintf("%02d:%02d-%02d:%02d", w.Start/60, w.Start%60, w.End/60, w.End%60)
}

// ParseRate parses a rate in bytes per second: a plain number of bytes, or
// a number with a binary suffix K (2^10), M (2^20) or G (2^30), upper or
// lower case, optionally followed by "B", "iB" or "/s" ("50M", "50MiB/s").
// "" and "0" mean unlimited and return 0. Negative or overflowing rates
// are refused.
func ParseRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(t, "/s")
	if t == "" {
		return 0, nil
	}
	mult := int64(1)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "i")
	if t != "" {
		switch t[len(t)-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		}
		if mult != 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("rate %q: want bytes per second like 50M, 512K or 1048576", s)
	}
	if n < 0 {
		return 0, fmt.Errorf("rate %q: must not be negative", s)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("rate %q: too large", s)
	}
	return n * mult, nil
}

// Validate checks that the time zone loads (time.LoadLocation; empty is
// UTC), that every window is valid and that MaxRate is not negative, for p
// and every policy in p.AllOf.
func (p SyncPolicy) Validate() error {
	if _, err := time.LoadLocation(p.TZ); err != nil {
		return fmt.Errorf("time zone %q: %w", p.TZ, err)
	}
	for _, w := range p.Windows {
		if err := w.validate(); err != nil {
			return fmt.Errorf("window %s: %w", w, err)
		}
	}
	if p.MaxRate < 0 {
		return fmt.Errorf("max rate %d: must not be negative", p.MaxRate)
	}
	for _, q := range p.AllOf {
		if err := q.Validate(); err != nil {
			return err
		}
	}
	return nil
}

// location is p's time zone; an invalid one (Validate reports it) is UTC.
func (p SyncPolicy) location() *time.Location {
	loc, err := time.LoadLocation(p.TZ)
	if err != nil {
		return time.UTC
	}
	return loc
}

// openHorizon bounds how far ahead Open looks for the next opening.
const openHorizon = 8 * 24 * time.Hour

// Open reports whether syncing is allowed at now. When open, closes is
// when the current window ends (zero: it never does, e.g. no windows or
// windows whose union covers the whole day) and opens is zero. When
// closed, opens is the next time it opens (zero: not within 8 days, e.g.
// AllOf policies whose windows never overlap) and closes is zero.
//
// Windows are laid out on the calendar days around now in p.TZ with
// time.Date, so a window across midnight and a day with a DST transition
// both last what the local wall clock says (22:00-06:00 on the night the
// clocks go forward is 7 hours long). Several windows are a union:
// overlapping or touching windows merge. AllOf narrows the result to an
// intersection.
func (p SyncPolicy) Open(now time.Time) (open bool, closes time.Time, opens time.Time) {
	if len(p.AllOf) == 0 {
		return p.openOwn(now)
	}
	parts := append([]SyncPolicy{{Windows: p.Windows, TZ: p.TZ}}, p.AllOf...)
	t := now
	for range 256 {
		if t.Sub(now) > openHorizon {
			return false, time.Time{}, time.Time{}
		}
		moved := false
		for _, q := range parts {
			o, _, op := q.Open(t)
			if !o {
				if op.IsZero() {
					return false, time.Time{}, time.Time{}
				}
				t = op
				moved = true
				break
			}
		}
		if moved {
			continue
		}
		if t.After(now) {
			return false, time.Time{}, t
		}
		for _, q := range parts {
			_, c, _ := q.Open(now)
			if !c.IsZero() && (closes.IsZero() || c.Before(closes)) {
				closes = c
			}
		}
		return true, closes, time.Time{}
	}
	return false, time.Time{}, time.Time{}
}

type interval struct{ start, end time.Time }

// openOwn is Open for p's own windows (AllOf ignored).
func (p SyncPolicy) openOwn(now time.Time) (bool, time.Time, time.Time) {
	if len(p.Windows) == 0 {
		return true, time.Time{}, time.Time{}
	}
	loc := p.location()
	local := now.In(loc)
	y, m, d := local.Date()
	var ivs []interval
	for k := -1; k <= 9; k++ {
		for _, w := range p.Windows {
			if w.validate() != nil {
				continue
			}
			st := time.Date(y, m, d+k, w.Start/60, w.Start%60, 0, 0, loc)
			endDay := d + k
			if w.End <= w.Start {
				endDay++
			}
			en := time.Date(y, m, endDay, w.End/60, w.End%60, 0, 0, loc)
			if en.After(st) {
				ivs = append(ivs, interval{st, en})
			}
		}
	}
	if len(ivs) == 0 {
		return false, time.Time{}, time.Time{}
	}
	sort.Slice(ivs, func(i, j int) bool { return ivs[i].start.Before(ivs[j].start) })
	merged := []interval{ivs[0]}
	for _, iv := range ivs[1:] {
		last := &merged[len(merged)-1]
		if !iv.start.After(last.end) {
			if iv.end.After(last.end) {
				last.end = iv.end
			}
			continue
		}
		merged = append(merged, iv)
	}
	for i, iv := range merged {
		if !now.Before(iv.start) && now.Before(iv.end) {
			if i == len(merged)-1 && iv.end.Sub(now) > openHorizon {
				// The union reaches the end of the days laid out: the
				// windows cover the whole day, it never closes.
				return true, time.Time{}, time.Time{}
			}
			return true, iv.end, time.Time{}
		}
		if iv.start.After(now) {
			return false, time.Time{}, iv.start
		}
	}
	return false, time.Time{}, time.Time{}
}

// describe is a short human form of p's windows, e.g.
// "22:00-06:00 Asia/Tokyo".
func (p SyncPolicy) describe() string {
	if len(p.Windows) == 0 && len(p.AllOf) == 0 {
		return "always"
	}
	var parts []string
	if len(p.Windows) > 0 {
		ws := make([]string, len(p.Windows))
		for i, w := range p.Windows {
			ws[i] = w.String()
		}
		tz := p.TZ
		if tz == "" {
			tz = "UTC"
		}
		parts = append(parts, strings.Join(ws, ",")+" "+tz)
	}
	for _, q := range p.AllOf {
		parts = append(parts, q.describe())
	}
	return strings.Join(parts, " and ")
}

// EffectiveSync is the sync policy whose windows apply to a sync of img
// involving nodes: the image's own Sync when set; otherwise the PerNode
// policies of the nodes involved that have one — one such policy is
// returned as is, several are combined into an intersection (AllOf: open
// only when every one of them is open, since each node's operator allowed
// traffic only in its own windows); otherwise s.Default.
//
// Rate caps are not merged here: the MaxRate of the result is the image's,
// the single node's or the Default's, and 0 for an intersection. Plan
// computes rates itself (see Plan, rule 4).
func EffectiveSync(s State, img ImageState, nodes ...string) SyncPolicy {
	if img.Sync != nil {
		return *img.Sync
	}
	var set []SyncPolicy
	seen := map[string]bool{}
	for _, n := range nodes {
		if seen[n] {
			continue
		}
		seen[n] = true
		if p, ok := s.PerNode[n]; ok {
			set = append(set, p)
		}
	}
	switch len(set) {
	case 0:
		return s.Default
	case 1:
		return set[0]
	}
	return SyncPolicy{AllOf: set}
}
