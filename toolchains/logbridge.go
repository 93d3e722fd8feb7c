package toolchains

import (
	"context"
	"io"
	"log/slog"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
)

// slogHook forwards containerd's logrus entries to the store's slog logger, so the
// library's warnings (e.g. an ignored layer entry) land where kiln's logs go.
type slogHook struct{ l *slog.Logger }

func (h slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h slogHook) Fire(e *logrus.Entry) error {
	lvl := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel:
		lvl = slog.LevelError
	case e.Level == logrus.WarnLevel:
		lvl = slog.LevelWarn
	case e.Level == logrus.InfoLevel:
		lvl = slog.LevelInfo
	}
	args := make([]any, 0, 2*len(e.Data)+2)
	args = append(args, "component", "containerd")
	for k, v := range e.Data {
		args = append(args, k, v)
	}
	h.l.Log(context.Background(), lvl, e.Message, args...)
	return nil
}

// newContainerdLogger builds a logrus entry that writes nowhere but through slogHook.
func newContainerdLogger(l *slog.Logger) *log.Entry {
	lg := logrus.New()
	lg.SetOutput(io.Discard)
	lg.SetLevel(logrus.DebugLevel)
	lg.AddHook(slogHook{l: l})
	return logrus.NewEntry(lg)
}

// withLog attaches the store's logger to ctx for containerd calls (log.G(ctx)).
func (s *Store) withLog(ctx context.Context) context.Context {
	return log.WithLogger(ctx, s.clog)
}
