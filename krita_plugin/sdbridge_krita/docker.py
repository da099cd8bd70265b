"""The "sdbridge" docker: widgets bound to a `Model`. Widgets write the artist's choices into
the model and redraw from its signals; they hold no state of their own."""

from __future__ import annotations

import html

from krita import DockWidget
from PyQt5.QtCore import QRegExp, Qt
from PyQt5.QtGui import QImage, QPixmap, QRegExpValidator
from PyQt5.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .model import Model

DOCKER_ID = "sdbridge_docker"
PREVIEW_SIZE = 160


class SdbridgeDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("sdbridge")
        self.model = Model()
        root = QWidget()
        layout = QVBoxLayout(root)
        # A short docker scrolls instead of squeezing the preview over the message.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidget(root)
        self.setWidget(scroll)

        self.connection = QLabel("Connecting …")
        self.connection.setObjectName("sdbridge_connection")
        self.connection.setWordWrap(True)
        self.address = QLineEdit(self.model.address)
        self.address.setObjectName("sdbridge_address")
        self.address.setToolTip("Where `sdbridge serve` listens; remembered for next time")
        reconnect = QPushButton("Connect")
        reconnect.setObjectName("sdbridge_connect")
        self.token = QLineEdit(self.model.token)
        self.token.setObjectName("sdbridge_token")
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("token (only if the daemon requires one)")
        address_row = QHBoxLayout()
        address_row.addWidget(self.address)
        address_row.addWidget(reconnect)
        layout.addWidget(self.connection)
        layout.addLayout(address_row)
        layout.addWidget(self.token)

        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("sdbridge_prompt")
        self.prompt.setPlaceholderText("Describe what to paint")
        self.prompt.setMaximumHeight(80)
        self.negative = QPlainTextEdit()
        self.negative.setObjectName("sdbridge_negative")
        self.negative.setPlaceholderText("What to avoid (negative prompt)")
        self.negative.setMaximumHeight(50)
        layout.addWidget(self.prompt)
        layout.addWidget(self.negative)

        form = QFormLayout()
        self.models = QComboBox()
        self.models.setObjectName("sdbridge_model")
        self.steps = QSpinBox()
        self.steps.setRange(1, 150)
        self.steps.setValue(self.model.steps)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 30.0)
        self.guidance.setSingleStep(0.5)
        self.guidance.setValue(self.model.guidance_scale)
        self.guidance.setToolTip("How closely to follow the prompt (1 or less: ignore it)")
        self.strength = QSpinBox()
        self.strength.setRange(1, 100)
        self.strength.setSuffix(" %")
        self.strength.setValue(round(self.model.strength * 100))
        self.strength.setToolTip("100 %: paint something new; lower: repaint what is there")
        self.images = QSpinBox()
        self.images.setRange(1, 8)
        self.images.setToolTip("Several images become one layer each, in a group")
        self.fixed_seed = QCheckBox("fixed")
        self.seed = QLineEdit("0")
        self.seed.setValidator(QRegExpValidator(QRegExp("[0-9]{1,10}")))
        self.seed.setEnabled(False)
        self.reuse_seed = QPushButton("Reuse last")
        self.reuse_seed.setEnabled(False)
        self.reuse_seed.setToolTip("Fix the seed of the last result, to vary it with the prompt")
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.fixed_seed)
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.reuse_seed)
        form.addRow("Model", self.models)
        form.addRow("Steps", self.steps)
        form.addRow("Guidance", self.guidance)
        form.addRow("Strength", self.strength)
        form.addRow("Images", self.images)
        form.addRow("Seed", seed_row)
        layout.addLayout(form)

        self.generate = QPushButton("Generate")
        self.generate.setObjectName("sdbridge_generate")
        self.cancel = QPushButton("Cancel")
        self.cancel.setObjectName("sdbridge_cancel")
        self.cancel.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate)
        buttons.addWidget(self.cancel)
        layout.addLayout(buttons)

        self.progress = QProgressBar()
        self.progress.setObjectName("sdbridge_progress")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("Step %v of %m")
        self.progress.setTextVisible(False)
        self.preview = QLabel()
        self.preview.setObjectName("sdbridge_preview")
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumHeight(PREVIEW_SIZE)
        self.message = QLabel()
        self.message.setObjectName("sdbridge_message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.progress)
        layout.addWidget(self.preview)
        layout.addWidget(self.message)
        layout.addStretch(1)

        self._bind(reconnect)

    def _bind(self, reconnect: QPushButton) -> None:
        m = self.model

        def apply_address() -> None:
            m.set_address(self.address.text(), self.token.text())

        self.address.returnPressed.connect(apply_address)
        self.token.returnPressed.connect(apply_address)
        reconnect.clicked.connect(apply_address)
        self.prompt.textChanged.connect(lambda: setattr(m, "prompt", self.prompt.toPlainText()))
        self.negative.textChanged.connect(
            lambda: setattr(m, "negative_prompt", self.negative.toPlainText())
        )
        self.models.currentTextChanged.connect(lambda name: setattr(m, "model_name", name))
        self.steps.valueChanged.connect(lambda value: setattr(m, "steps", value))
        self.guidance.valueChanged.connect(lambda value: setattr(m, "guidance_scale", value))
        self.strength.valueChanged.connect(lambda value: setattr(m, "strength", value / 100))
        self.images.valueChanged.connect(lambda value: setattr(m, "num_images", value))
        self.fixed_seed.toggled.connect(self._on_fixed_seed)
        self.seed.textChanged.connect(lambda text: setattr(m, "seed", int(text or 0)))
        self.reuse_seed.clicked.connect(self._on_reuse_seed)
        self.generate.clicked.connect(m.generate)
        self.cancel.clicked.connect(m.cancel)

        m.connection_changed.connect(self._on_connection)
        m.models_changed.connect(self._on_models)
        m.running_changed.connect(self._on_running)
        m.progress_changed.connect(self._on_progress)
        m.preview_changed.connect(self._on_preview)
        m.message_changed.connect(self._on_message)
        m.last_seed_changed.connect(lambda _seed: self.reuse_seed.setEnabled(True))

    def canvasChanged(self, canvas) -> None:  # noqa: N802 (Krita's name)
        """Required by DockWidget; jobs read the active document when Generate is pressed."""

    def _on_fixed_seed(self, fixed: bool) -> None:
        self.model.fixed_seed = fixed
        self.seed.setEnabled(fixed)

    def _on_reuse_seed(self) -> None:
        self.model.reuse_last_seed()
        self.fixed_seed.setChecked(True)
        self.seed.setText(str(self.model.seed))

    def _on_connection(self, connected: bool, message: str, detail: str) -> None:
        colour = "#3a3" if connected else "#c33"
        dot = f"<span style='color:{colour}'>●</span>"
        self.connection.setText(f"{dot} {html.escape(message)}")  # rich text: escape the rest
        self.connection.setToolTip(detail)

    def _on_models(self, names: list, current: str) -> None:
        self.models.blockSignals(True)
        self.models.clear()
        self.models.addItems(names)
        self.models.setCurrentText(current)
        self.models.blockSignals(False)

    def _on_running(self, running: bool) -> None:
        self.generate.setEnabled(not running)
        self.cancel.setEnabled(running)

    def _on_progress(self, step: int, total: int) -> None:
        self.progress.setTextVisible(total > 0)
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(step)

    def _on_preview(self, image: QImage) -> None:
        pixmap = QPixmap.fromImage(image).scaled(
            PREVIEW_SIZE, PREVIEW_SIZE, Qt.KeepAspectRatio, Qt.SmoothTransformation
        )
        self.preview.setPixmap(pixmap)

    def _on_message(self, text: str, is_error: bool) -> None:
        self.message.setStyleSheet("color: #c33" if is_error else "")
        self.message.setText(text)
