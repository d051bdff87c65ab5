package backoff

import (
	"testing"
	"time"
)

func TestDelay(t *testing.T) {
	base := 100 * time.Millisecond
	for attempt := 1; attempt < 20; attempt++ {
		nominal := min(base<<(attempt-1), 30*base)
		d := Delay(base, attempt)
		if d < nominal/2 || d > nominal {
			t.Errorf("Delay(%v, %d) = %v; want within [%v, %v]", base, attempt, d, nominal/2, nominal)
		}
	}
}
