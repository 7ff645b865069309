package placement

import (
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // the zones the tests use, whatever the host has
)

func TestParseWindow(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    Window
		wantErr string
	}{
		{"22:00-06:00", Window{22 * 60, 6 * 60}, ""},
		{"09:30-17:00", Window{9*60 + 30, 17 * 60}, ""},
		{" 9:30 - 17:00 ", Window{9*60 + 30, 17 * 60}, ""},
		{"00:00-23:59", Window{0, 23*60 + 59}, ""},
		{"06:00-06:00", Window{}, "start equals end"},
		{"24:00-06:00", Window{}, "hour 24 out of range"},
		{"22:60-06:00", Window{}, "minute 60 out of range"},
		{"22:00", Window{}, "want HH:MM-HH:MM"},
		{"22-06", Window{}, "not HH:MM"},
		{"2200-0600", Window{}, "not HH:MM"},
		{"-1:00-06:00", Window{}, "not HH:MM"},
		{"", Window{}, "want HH:MM-HH:MM"},
	} {
		w, err := ParseWindow(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("ParseWindow(%q) = %v, %v; want error containing %q", c.in, w, err, c.wantErr)
			}
			continue
		}
		if err != nil || w != c.want {
			t.Errorf("ParseWindow(%q) = %v, %v; want %v", c.in, w, err, c.want)
		}
	}
	if s := (Window{22 * 60, 6 * 60}).String(); s != "22:00-06:00" {
		t.Errorf("String = %q", s)
	}
}

func FuzzParseWindow(f *testing.F) {
	for _, s := range []string{"22:00-06:00", "09:30-17:00", "0:00-1:00", "24:00-1:00", "a-b", "::-", "-"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		w, err := ParseWindow(s)
		if err != nil {
			return
		}
		if w.validate() != nil {
			t.Fatalf("ParseWindow(%q) accepted invalid %+v", s, w)
		}
		w2, err := ParseWindow(w.String())
		if err != nil || w2 != w {
			t.Fatalf("round trip %q → %v → %q → %v, %v", s, w, w.String(), w2, err)
		}
	})
}

func TestParseRate(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"", 0, true}, {"0", 0, true}, {"1048576", 1 << 20, true},
		{"50M", 50 << 20, true}, {"512K", 512 << 10, true}, {"2G", 2 << 30, true},
		{"50MiB/s", 50 << 20, true}, {"10m", 10 << 20, true}, {"7B", 7, true},
		{"-1", 0, false}, {"5X", 0, false}, {"M", 0, false}, {"99999999999G", 0, false}, {"1.5M", 0, false},
	} {
		got, err := ParseRate(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestSyncPolicyValidate(t *testing.T) {
	good := SyncPolicy{Windows: []Window{{22 * 60, 6 * 60}}, TZ: "Asia/Tokyo", MaxRate: 1}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []SyncPolicy{
		{TZ: "Mars/Olympus"},
		{Windows: []Window{{60, 60}}},
		{Windows: []Window{{-1, 60}}},
		{Windows: []Window{{0, 1440}}},
		{MaxRate: -1},
		{AllOf: []SyncPolicy{{TZ: "Nowhere/Else"}}},
	} {
		if err := p.Validate(); err == nil {
			t.Errorf("%+v: want error", p)
		}
	}
}

func mustWindows(t testing.TB, ss ...string) []Window {
	t.Helper()
	var ws []Window
	for _, s := range ss {
		w, err := ParseWindow(s)
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	return ws
}

func mustLoc(t testing.TB, name string) *time.Location {
	t.Helper()
	l, err := time.LoadLocation(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestOpen(t *testing.T) {
	utc := time.UTC
	tokyo := mustLoc(t, "Asia/Tokyo")
	berlin := mustLoc(t, "Europe/Berlin")
	at := func(loc *time.Location, y int, mo time.Month, d, h, mi int) time.Time {
		return time.Date(y, mo, d, h, mi, 0, 0, loc)
	}
	var zero time.Time
	night := mustWindows(t, "22:00-06:00")
	for _, c := range []struct {
		name   string
		p      SyncPolicy
		now    time.Time
		open   bool
		closes time.Time
		opens  time.Time
	}{
		{"no windows", SyncPolicy{}, at(utc, 2026, 1, 5, 12, 0), true, zero, zero},
		{"night 23:00", SyncPolicy{Windows: night}, at(utc, 2026, 1, 5, 23, 0), true, at(utc, 2026, 1, 6, 6, 0), zero},
		{"night 05:59", SyncPolicy{Windows: night}, at(utc, 2026, 1, 6, 5, 59), true, at(utc, 2026, 1, 6, 6, 0), zero},
		{"night 06:00", SyncPolicy{Windows: night}, at(utc, 2026, 1, 6, 6, 0), false, zero, at(utc, 2026, 1, 6, 22, 0)},
		{"night 12:00", SyncPolicy{Windows: night}, at(utc, 2026, 1, 6, 12, 0), false, zero, at(utc, 2026, 1, 6, 22, 0)},
		{"night 22:00", SyncPolicy{Windows: night}, at(utc, 2026, 1, 6, 22, 0), true, at(utc, 2026, 1, 7, 6, 0), zero},
		// Tokyo is UTC+9: 22:00-06:00 JST is 13:00-21:00 UTC.
		{"tokyo 14:00Z", SyncPolicy{Windows: night, TZ: "Asia/Tokyo"}, at(utc, 2026, 1, 6, 14, 0), true, at(tokyo, 2026, 1, 7, 6, 0), zero},
		{"tokyo 23:00Z", SyncPolicy{Windows: night, TZ: "Asia/Tokyo"}, at(utc, 2026, 1, 6, 23, 0), false, zero, at(utc, 2026, 1, 7, 13, 0)},
		{"utc 14:00Z", SyncPolicy{Windows: night, TZ: "UTC"}, at(utc, 2026, 1, 6, 14, 0), false, zero, at(utc, 2026, 1, 6, 22, 0)},
		// Berlin springs forward 2026-03-29 02:00 CET → 03:00 CEST: the
		// night window is 7 real hours, 21:00Z to 04:00Z.
		{"berlin spring 03:30 local", SyncPolicy{Windows: night, TZ: "Europe/Berlin"}, at(berlin, 2026, 3, 29, 3, 30), true, at(utc, 2026, 3, 29, 4, 0), zero},
		{"berlin spring before", SyncPolicy{Windows: night, TZ: "Europe/Berlin"}, at(utc, 2026, 3, 28, 20, 59), false, zero, at(utc, 2026, 3, 28, 21, 0)},
		// Falls back 2026-10-25 03:00 CEST → 02:00 CET: 9 real hours, 20:00Z to 05:00Z.
		{"berlin fall ambiguous hour", SyncPolicy{Windows: night, TZ: "Europe/Berlin"}, at(utc, 2026, 10, 25, 0, 30), true, at(utc, 2026, 10, 25, 5, 0), zero},
		{"berlin fall 05:00Z", SyncPolicy{Windows: night, TZ: "Europe/Berlin"}, at(utc, 2026, 10, 25, 5, 0), false, zero, at(utc, 2026, 10, 25, 21, 0)},
		{"several 12:00", SyncPolicy{Windows: mustWindows(t, "01:00-03:00", "13:00-14:00")}, at(utc, 2026, 1, 6, 12, 0), false, zero, at(utc, 2026, 1, 6, 13, 0)},
		{"several 02:00", SyncPolicy{Windows: mustWindows(t, "01:00-03:00", "13:00-14:00")}, at(utc, 2026, 1, 6, 2, 0), true, at(utc, 2026, 1, 6, 3, 0), zero},
		{"touching union", SyncPolicy{Windows: mustWindows(t, "22:00-06:00", "06:00-08:00")}, at(utc, 2026, 1, 6, 5, 0), true, at(utc, 2026, 1, 6, 8, 0), zero},
		{"whole day union", SyncPolicy{Windows: mustWindows(t, "00:00-12:00", "12:00-00:00")}, at(utc, 2026, 1, 6, 5, 0), true, zero, zero},
		{"intersection open", SyncPolicy{AllOf: []SyncPolicy{{Windows: night}, {Windows: mustWindows(t, "01:00-09:00")}}}, at(utc, 2026, 1, 6, 2, 0), true, at(utc, 2026, 1, 6, 6, 0), zero},
		{"intersection closed", SyncPolicy{AllOf: []SyncPolicy{{Windows: night}, {Windows: mustWindows(t, "01:00-09:00")}}}, at(utc, 2026, 1, 6, 23, 0), false, zero, at(utc, 2026, 1, 7, 1, 0)},
		{"intersection never", SyncPolicy{AllOf: []SyncPolicy{{Windows: mustWindows(t, "01:00-02:00")}, {Windows: mustWindows(t, "03:00-04:00")}}}, at(utc, 2026, 1, 6, 0, 0), false, zero, zero},
	} {
		open, closes, opens := c.p.Open(c.now)
		if open != c.open || !closes.Equal(c.closes) || !opens.Equal(c.opens) {
			t.Errorf("%s: Open(%s) = %v, %s, %s; want %v, %s, %s", c.name, c.now.UTC(), open, closes.UTC(), opens.UTC(), c.open, c.closes.UTC(), c.opens.UTC())
		}
	}
}

func TestEffectiveSync(t *testing.T) {
	own := &SyncPolicy{TZ: "Asia/Tokyo", MaxRate: 7}
	a := SyncPolicy{Windows: mustWindows(t, "22:00-06:00")}
	b := SyncPolicy{Windows: mustWindows(t, "01:00-09:00")}
	s := State{Default: SyncPolicy{TZ: "UTC", MaxRate: 3}, PerNode: map[string]SyncPolicy{"n1": a, "n2": b}}
	if got := EffectiveSync(s, ImageState{Sync: own}, "n1"); got.TZ != "Asia/Tokyo" || got.MaxRate != 7 {
		t.Errorf("image policy: %+v", got)
	}
	if got := EffectiveSync(s, ImageState{}, "n3"); got.MaxRate != 3 || len(got.Windows) != 0 {
		t.Errorf("default: %+v", got)
	}
	if got := EffectiveSync(s, ImageState{}, "n1", "n3", "n1"); len(got.Windows) != 1 || got.Windows[0] != a.Windows[0] {
		t.Errorf("one node: %+v", got)
	}
	if got := EffectiveSync(s, ImageState{}, "n1", "n2"); len(got.AllOf) != 2 {
		t.Errorf("two nodes: %+v", got)
	}
}
