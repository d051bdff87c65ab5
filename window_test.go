package main

import (
	"errors"
	"testing"
	"time"
)

func TestParseWindowErrors(t *testing.T) {
	for _, spec := range []string{
		"", "Mon-Fri", "Mon-Fri 9-17", "Mon-Fry 09:00-17:00", "Mon-Fri 09:00-09:00", "Mon-Fri 09:00-25:00",
		"Mon-Fri 09:00-17:00 Mars/Olympus", "Mon-Fri 09:00-17:00 UTC extra", "cron 61 * * * *", "cron * * *",
	} {
		if _, err := parseWindow(spec); !errors.Is(err, errWindow) {
			t.Errorf("parseWindow(%q) = %v, want errWindow", spec, err)
		}
	}
}

func TestWindowOpenAndNext(t *testing.T) {
	berlin, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		t.Fatal(err)
	}
	at := func(s string) time.Time { return must(time.ParseInLocation("2006-01-02 15:04", s, berlin)) }
	utc := func(s string) time.Time { return must(time.Parse("2006-01-02 15:04", s)) }
	// 2026-12-07 is a Monday.
	for _, tc := range []struct {
		spec string
		t    time.Time
		open bool
		next time.Time // when closed
	}{
		{"Mon-Fri 09:00-17:00 Europe/Berlin", at("2026-12-07 09:00"), true, time.Time{}},
		{"Mon-Fri 09:00-17:00 Europe/Berlin", at("2026-12-07 16:59"), true, time.Time{}},
		{"Mon-Fri 09:00-17:00 Europe/Berlin", at("2026-12-07 17:00"), false, at("2026-12-08 09:00")},
		{"Mon-Fri 09:00-17:00 Europe/Berlin", at("2026-12-07 08:59"), false, at("2026-12-07 09:00")},
		{"Mon-Fri 09:00-17:00 Europe/Berlin", at("2026-12-11 18:00"), false, at("2026-12-14 09:00")}, // Friday evening: Monday
		{"Mon-Fri 09:00-17:00 Europe/Berlin", utc("2026-12-07 08:30"), true, time.Time{}},            // 09:30 in Berlin
		{"Mon-Fri 09:00-17:00", utc("2026-12-07 08:30"), false, utc("2026-12-07 09:00")},             // UTC by default
		{"Sat,Sun 10:00-12:00", utc("2026-12-12 11:00"), true, time.Time{}},
		{"Fri 22:00-02:00", utc("2026-12-12 01:00"), true, time.Time{}}, // Saturday 01:00: Friday's span
		{"Fri 22:00-02:00", utc("2026-12-12 02:00"), false, utc("2026-12-18 22:00")},
		{"Fri-Mon 09:00-10:00", utc("2026-12-13 09:30"), true, time.Time{}}, // a range across Sunday
		{"daily 00:00-24:00", utc("2026-12-13 23:59"), true, time.Time{}},
		{"cron * 9-16 * * 1-5", utc("2026-12-07 16:59"), true, time.Time{}},
		{"cron * 9-16 * * 1-5", utc("2026-12-07 17:00"), false, utc("2026-12-08 09:00")},
		{"cron CRON_TZ=Europe/Berlin * 9-16 * * Mon-Fri", utc("2026-12-07 08:30"), true, time.Time{}},
		{"cron CRON_TZ=Europe/Berlin * 9-16 * * Mon-Fri", utc("2026-12-07 07:59"), false, utc("2026-12-07 08:00")},
		{"cron 0-14 * * * *", utc("2026-12-07 10:14"), true, time.Time{}},
		{"cron 0-14 * * * *", utc("2026-12-07 10:15"), false, utc("2026-12-07 11:00")},
		{"cron 30-59 59 9 * * *", utc("2026-12-07 09:59").Add(29 * time.Second), false, utc("2026-12-07 09:59").Add(30 * time.Second)},
		{"cron 30-59 59 9 * * *", utc("2026-12-07 09:59").Add(30 * time.Second), true, time.Time{}},
		{"cron 30-59 59 9 * * *", utc("2026-12-07 10:00"), false, utc("2026-12-08 09:59").Add(30 * time.Second)},
	} {
		w, err := parseWindow(tc.spec)
		if err != nil {
			t.Fatalf("parseWindow(%q): %v", tc.spec, err)
		}
		if got := w.open(tc.t); got != tc.open {
			t.Errorf("%q open at %s = %v, want %v", tc.spec, tc.t, got, tc.open)
		}
		want := tc.next
		if tc.open {
			want = tc.t
		}
		if got := w.next(tc.t); !got.Equal(want) {
			t.Errorf("%q next after %s = %s, want %s", tc.spec, tc.t, got, want)
		}
	}
}

func TestWindowsUnion(t *testing.T) {
	utc := func(s string) time.Time { return must(time.Parse("2006-01-02 15:04", s)) }
	var none windows
	if !none.open(utc("2026-12-07 03:00")) {
		t.Error("no windows: want always open")
	}
	ws := windows{must(parseWindow("Mon 09:00-10:00")), must(parseWindow("Mon 12:00-13:00"))}
	if ws.open(utc("2026-12-07 11:00")) || !ws.open(utc("2026-12-07 12:30")) {
		t.Error("union wrong")
	}
	if got, want := ws.next(utc("2026-12-07 10:30")), utc("2026-12-07 12:00"); !got.Equal(want) {
		t.Errorf("next = %s, want %s", got, want)
	}
}
