package main

// window.go: deploy windows, the times a policy (policy.go) lets a new
// version replace containers. Two forms:
//
//	Mon-Fri 09:00-17:00 Europe/Berlin   days, a span of the clock, a time zone (default UTC)
//	cron 0-59 9-16 * * Mon-Fri           open during every minute a cron expression matches
//	cron 30-59 59 8 * * Mon              with six fields, a seconds field first: open during every second it matches
//
// Days are a range (Mon-Fri), a list (Mon,Wed,Fri), a mix, or "daily";
// a span whose end is not after its start runs past midnight (Fri
// 22:00-02:00 is open from Friday 22:00 to Saturday 02:00). The cron form
// takes the five fields of crontab(5) (robfig/cron's standard parser),
// optionally after CRON_TZ=<zone>; "cron * 9-16 * * 1-5" is the same
// window as "Mon-Fri 09:00-17:00". Time zones come from the system's
// database (time.LoadLocation).

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// errWindow marks a window that does not parse.
var errWindow = errors.New("bad deploy window")

// window is one parsed deploy window.
type window struct {
	spec string // as written

	// The days form.
	days       [7]bool // by time.Weekday
	start, end time.Duration
	loc        *time.Location

	// The cron form.
	sched cron.Schedule
	step  time.Duration // a minute, or a second with a seconds field
}

var weekdays = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

var cronParser = cron.NewParser(cron.SecondOptional | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow)

// parseWindow parses one window in either form.
func parseWindow(spec string) (window, error) {
	spec = strings.TrimSpace(spec)
	w := window{spec: spec}
	if rest, ok := strings.CutPrefix(spec, "cron "); ok {
		s, err := cronParser.Parse(strings.TrimSpace(rest))
		if err != nil {
			return w, fmt.Errorf("%w %q: %w", errWindow, spec, err)
		}
		w.sched, w.step = s, time.Minute
		fields := strings.Fields(rest)
		if len(fields) > 0 && strings.Contains(fields[0], "TZ=") {
			fields = fields[1:]
		}
		if len(fields) == 6 {
			w.step = time.Second
		}
		return w, nil
	}
	f := strings.Fields(spec)
	if len(f) < 2 || len(f) > 3 {
		return w, fmt.Errorf(`%w %q: want "Mon-Fri 09:00-17:00 [zone]" or "cron <minute> <hour> <day> <month> <weekday>"`, errWindow, spec)
	}
	if err := w.parseDays(f[0]); err != nil {
		return w, fmt.Errorf("%w %q: %w", errWindow, spec, err)
	}
	from, to, ok := strings.Cut(f[1], "-")
	if !ok {
		return w, fmt.Errorf("%w %q: want a span such as 09:00-17:00", errWindow, spec)
	}
	var err error
	if w.start, err = clockTime(from); err == nil {
		w.end, err = clockTime(to)
	}
	if err != nil {
		return w, fmt.Errorf("%w %q: %w", errWindow, spec, err)
	}
	if w.start == w.end {
		return w, fmt.Errorf("%w %q: an empty span", errWindow, spec)
	}
	w.loc = time.UTC
	if len(f) == 3 {
		if w.loc, err = time.LoadLocation(f[2]); err != nil {
			return w, fmt.Errorf("%w %q: time zone: %w", errWindow, spec, err)
		}
	}
	return w, nil
}

func (w *window) parseDays(s string) error {
	if strings.EqualFold(s, "daily") {
		w.days = [7]bool{true, true, true, true, true, true, true}
		return nil
	}
	day := func(s string) (time.Weekday, error) {
		d, ok := weekdays[strings.ToLower(s)]
		if !ok {
			return 0, fmt.Errorf("%q is not a day (Mon … Sun)", s)
		}
		return d, nil
	}
	for _, part := range strings.Split(s, ",") {
		from, to, isRange := strings.Cut(part, "-")
		a, err := day(from)
		if err != nil {
			return err
		}
		b := a
		if isRange {
			if b, err = day(to); err != nil {
				return err
			}
		}
		for d := a; ; d = (d + 1) % 7 {
			w.days[d] = true
			if d == b {
				break
			}
		}
	}
	return nil
}

// clockTime parses "HH:MM" (24:00 allowed as the end of a day).
func clockTime(s string) (time.Duration, error) {
	var h, m int
	if n, err := fmt.Sscanf(s, "%d:%d", &h, &m); n != 2 || err != nil || len(s) != 5 || h < 0 || m < 0 || m > 59 || h > 24 || (h == 24 && m > 0) {
		return 0, fmt.Errorf("%q is not a time of day (HH:MM)", s)
	}
	return time.Duration(h)*time.Hour + time.Duration(m)*time.Minute, nil
}

// at is the instant of clock time d on the day of t in w's zone.
func (w window) at(y int, mo time.Month, day int, d time.Duration) time.Time {
	return time.Date(y, mo, day, 0, 0, 0, 0, w.loc).Add(d)
}

// open reports whether t is inside the window.
func (w window) open(t time.Time) bool {
	if w.sched != nil {
		m := t.Truncate(w.step)
		return w.sched.Next(m.Add(-time.Second)).Equal(m)
	}
	lt := t.In(w.loc)
	// The span that starts today, and yesterday's when it runs past
	// midnight.
	for back := 0; back <= 1; back++ {
		y, mo, d := lt.AddDate(0, 0, -back).Date()
		wd := time.Date(y, mo, d, 12, 0, 0, 0, w.loc).Weekday()
		if !w.days[wd] {
			continue
		}
		start, end := w.at(y, mo, d, w.start), w.at(y, mo, d, w.end)
		if w.end <= w.start {
			end = w.at(y, mo, d+1, w.end)
		}
		if !t.Before(start) && t.Before(end) {
			return true
		}
	}
	return false
}

// next returns when the window next opens after t (t itself when open),
// or the zero time when it never does (a cron expression that matches no
// date, such as Feb 30).
func (w window) next(t time.Time) time.Time {
	if w.open(t) {
		return t
	}
	if w.sched != nil {
		return w.sched.Next(t)
	}
	lt := t.In(w.loc)
	for ahead := 0; ahead <= 7; ahead++ {
		y, mo, d := lt.AddDate(0, 0, ahead).Date()
		if !w.days[time.Date(y, mo, d, 12, 0, 0, 0, w.loc).Weekday()] {
			continue
		}
		if start := w.at(y, mo, d, w.start); start.After(t) {
			return start
		}
	}
	return time.Time{}
}

func (w window) String() string { return w.spec }

// windows is a policy's deploy windows: open when any is, always open
// when there are none.
type windows []window

func (ws windows) open(t time.Time) bool {
	for _, w := range ws {
		if w.open(t) {
			return true
		}
	}
	return len(ws) == 0
}

// next returns when the first of the windows opens after t (t when one is
// open), or the zero time when none ever does.
func (ws windows) next(t time.Time) time.Time {
	if ws.open(t) {
		return t
	}
	var first time.Time
	for _, w := range ws {
		if n := w.next(t); !n.IsZero() && (first.IsZero() || n.Before(first)) {
			first = n
		}
	}
	return first
}
